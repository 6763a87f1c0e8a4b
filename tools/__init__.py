"""Developer tools: browser automation, screenshots."""
