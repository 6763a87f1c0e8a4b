async ({ loaderUrl, bundleUrl, phases, bundleType, resyncType }) => {
  // A page's side of widgets.figure.Figure without a kernel: the loader module and plotly's bundle, a stand-in
  // for anywidget's model and a stand-in kernel. One figure per phase, each with one edit (trace 0: y = [7]) made
  // in that phase of the loader's life; returns what each figure drew and what the kernel holds.
  // Phases: stale (the page's state was copied before the edit, whose message never came), queued (before the
  // loader's initialize: anywidget holds messages until then), loading (before plotly's bundle arrived), resync
  // (in flight when the page asks for the full state), drawing (while Plotly.newPlot is under way), after.
  const bundleText = await (await fetch(bundleUrl)).text();
  const { default: factory } = await import(loaderUrl);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const clone = (x) => JSON.parse(JSON.stringify(x));
  class Model {  // the parts of an anywidget model the loader and plotly use
    constructor(kernel, state) { Object.assign(this, { kernel, state, handlers: {}, ready: false, queue: [] }); }
    get(key) {  // plotly's view reads _config just before Plotly.newPlot: the hook for edits while it draws
      if (key === "_config" && this.kernel.phase === "drawing") queueMicrotask(() => this.kernel.edit(7));
      return this.state[key];
    }
    set(key, value) {
      const old = this.state[key];
      this.state[key] = value;
      if (old !== value) this.emit(`change:${key}`, this, value);
    }
    on(name, cb) { (this.handlers[name] ??= []).push(cb); }
    off(name, cb) { this.handlers[name] = (this.handlers[name] || []).filter((h) => h !== cb); }
    emit(name, ...args) { for (const h of [...(this.handlers[name] || [])]) h(...args); }
    save_changes() {}
    send(content) { this.kernel.request(content); }
    deliver(message) { if (this.ready) message(); else this.queue.push(message); }  // anywidget waits for initialize
  }
  function kernel(phase) {  // the Python figure: edits change it, then send their message; answers BUNDLE/RESYNC
    const k = { phase, data: [{ type: "scatter", mode: "markers", x: [], y: [], uid: "t0" }], model: null };
    k.change = (value) => { k.data[0].x = [0]; k.data[0].y = [value]; };
    k.edit = (value) => {
      k.change(value);
      const msg = { style_data: { x: [[0]], y: [[value]] }, layout_data: {}, style_traces: [0], trace_edit_id: 1,
                    layout_edit_id: 1, source_view_id: null };
      k.model.deliver(() => { k.model.set("_py2js_update", msg); k.model.set("_py2js_update", null); });
    };
    k.request = async ({ type }) => {
      if (type === bundleType) {
        await sleep(300);
        k.model.emit("msg:custom", { type, text: bundleText });
      } else if (type === resyncType) {
        if (phase === "resync") k.edit(7);  // an edit in flight when the page asks
        await sleep(100);
        k.model.set("_widget_data", clone(k.data));
        k.model.emit("msg:custom", { type });
      }
    };
    return k;
  }
  async function scenario(phase) {
    const k = kernel(phase);
    const model = new Model(k, { _widget_data: clone(k.data), _widget_layout: { width: 300, height: 200 }, _config: {},
                                 _bundle_key: "harness", _last_layout_edit_id: 0, _last_trace_edit_id: 0 });
    k.model = model;
    if (phase === "stale") k.change(7);  // the page's state was copied before this edit; its message never came
    const widget = factory();
    if (phase === "queued") k.edit(7);
    widget.initialize({ model, experimental: {} });
    model.ready = true;
    for (const message of model.queue.splice(0)) message();
    const el = document.createElement("div");
    document.body.append(el);
    document.addEventListener("plotlywidget-after-render", (e) => {
      if (e.detail.element === el && phase === "after") k.edit(7);
    });
    if (phase === "loading") setTimeout(() => k.edit(7), 50);
    await widget.render({ model, el, experimental: {} });
    for (let i = 0; i < 100; i++) {
      if (el.querySelectorAll(".scatterlayer .trace path.point").length === 1 && el.data[0].y[0] === 7) break;
      await sleep(50);
    }
    return { phase, drawn: el.querySelectorAll(".scatterlayer .trace path.point").length, y: el.data && el.data[0].y,
             want: k.data[0].y, model: model.get("_widget_data")[0].y };
  }
  return await Promise.all(phases.map(scenario));
}
