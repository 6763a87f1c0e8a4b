"""Serving the app to others: the Voila dashboard, the publisher's lock, shared run slots, the kernel cap."""
