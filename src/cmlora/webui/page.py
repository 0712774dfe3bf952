"""The single page of ``cmlora ui``: HTML, CSS and vanilla JS in one string.

A Python string rather than a package-data file so it ships in every install (no packaging
rule to forget) and needs no build step; all text from the server is inserted with
``textContent``, never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>cmlora ui</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f8; color: #222; }
  header { background: #2d3142; color: #fff; padding: 8px 16px; display: flex; gap: 16px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  #note { color: #ffd166; font-size: 13px; }
  main { display: grid; grid-template-columns: minmax(340px, 430px) 1fr; gap: 16px; padding: 16px; }
  section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin-bottom: 12px; }
  h2 { font-size: 14px; margin: 0 0 8px; text-transform: uppercase; color: #555; }
  label { font-size: 13px; }
  textarea, input[type=text] { width: 100%; box-sizing: border-box; font-family: inherit; font-size: 13px; }
  input[type=number] { width: 80px; }
  .row { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin: 4px 0; }
  table { border-collapse: collapse; width: 100%; font-size: 13px; }
  td, th { padding: 2px 4px; text-align: left; }
  #selected input[type=number] { width: 60px; }
  button { cursor: pointer; }
  #generate { font-size: 15px; padding: 6px 18px; background: #4f5d75; color: #fff; border: 0; border-radius: 4px; }
  #generate:disabled { background: #aaa; }
  #error { display: none; background: #fde2e1; border: 1px solid #e5534b; color: #8b1d18; padding: 8px 10px;
           border-radius: 4px; white-space: pre-wrap; margin-bottom: 12px; }
  #status { font-size: 13px; color: #555; margin: 6px 0; }
  .prog { display: grid; grid-template-columns: 150px 1fr 90px; gap: 8px; align-items: center; font-size: 13px; }
  progress { width: 100%; }
  #results { display: flex; flex-wrap: wrap; gap: 12px; }
  .result { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 280px; font-size: 13px; }
  .result img { width: 256px; height: 256px; object-fit: contain; image-rendering: pixelated; background: #eee; display: block; }
  .result h3 { margin: 0 0 6px; font-size: 14px; }
  .muted { color: #777; font-size: 12px; }
</style>
</head>
<body>
<header><h1>cmlora ui</h1><span id="model"></span><span id="note"></span></header>
<main>
<div id="form">
  <section>
    <h2>LoRAs</h2>
    <div class="muted" id="lora-source"></div>
    <div id="catalog"></div>
    <div class="row"><input type="text" id="add-path" placeholder="or a LoRA file path">
      <button id="add-path-button" type="button">add file</button></div>
    <table id="selected"><thead><tr><th>#</th><th>LoRA</th><th>weight</th><th>category</th><th></th></tr></thead>
      <tbody></tbody></table>
    <div class="row"><label>profile file (cmlora order) <input type="text" id="profile" placeholder="profile.json (optional)"></label></div>
  </section>
  <section>
    <h2>Prompt</h2>
    <textarea id="prompt" rows="3"></textarea>
    <label>negative prompt</label><textarea id="negative_prompt" rows="2"></textarea>
  </section>
  <section>
    <h2>Methods</h2>
    <div id="methods" class="row"></div>
    <label>method options (JSON, e.g. {"tau": 3}; each method takes those it knows)</label>
    <input type="text" id="options" placeholder="{}">
  </section>
  <section>
    <h2>Settings</h2>
    <div class="row">
      <label>seed <input type="number" id="seed" min="0"></label>
      <label>steps <input type="number" id="steps" min="1"></label>
      <label>guidance <input type="number" id="guidance" step="0.5"></label>
    </div>
    <div class="row">
      <label>width <input type="number" id="width" step="8"></label>
      <label>height <input type="number" id="height" step="8"></label>
      <label>LoRA scale <input type="number" id="lora_scale" step="0.1"></label>
    </div>
    <div class="row"><button id="generate" type="button">Generate</button>
      <button id="cancel" type="button" disabled>Cancel</button></div>
  </section>
  <section>
    <h2>Paste a record</h2>
    <textarea id="record" rows="4" placeholder="paste the JSON record of a cmlora image"></textarea>
    <div class="row"><button id="fill" type="button">Fill the form</button>
      <label>or a cmlora PNG <input type="file" id="record-file" accept="image/png,.json"></label></div>
  </section>
</div>
<div>
  <div id="error"></div>
  <div id="status"></div>
  <div id="progress"></div>
  <div id="results"></div>
</div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let settings = null, catalog = {}, selected = [], jobId = null, timer = null, shown = 0, polling = false;

async function api(path, body) {
  const init = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = { error: "bad answer from the server (" + response.status + ")" }; }
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}
function showError(message) { const box = $("error"); box.textContent = message; box.style.display = message ? "block" : "none"; }
function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

// ------------------------------------------------------------------ LoRA selection
function renderCatalog() {
  const box = $("catalog"); box.textContent = "";
  for (const name of Object.keys(catalog)) {
    const info = catalog[name];
    const box1 = el("input", { type: "checkbox", id: "lora-" + name, checked: selected.some((s) => s.name === name && !s.file) });
    box1.addEventListener("change", () => toggleLora(name, box1.checked));
    const extra = [info.category, (info.triggers || []).join(", ")].filter(Boolean).join(" · ");
    box.append(el("div", {}, [el("label", {}, [box1, " " + name + " ", el("span", { className: "muted", textContent: extra })])]));
  }
  if (!Object.keys(catalog).length) box.textContent = "no LoRA files found";
}
function toggleLora(name, on) {
  const info = catalog[name];
  if (on && !selected.some((s) => s.name === name)) {
    selected.push({ name, weight: 1.0, category: info.category || "" });
    setTriggers(info.triggers || [], true);
  } else if (!on) {
    selected = selected.filter((s) => s.name !== name || s.file);
    setTriggers(info.triggers || [], false);
  }
  renderSelected();
}
function setTriggers(triggers, add) {
  let parts = $("prompt").value.split(",").map((p) => p.trim()).filter(Boolean);
  for (const t of triggers) {
    if (add && !parts.includes(t)) parts.push(t);
    if (!add) parts = parts.filter((p) => p !== t);
  }
  $("prompt").value = parts.join(", ");
}
function renderSelected() {
  const body = $("selected").querySelector("tbody"); body.textContent = "";
  selected.forEach((s, k) => {
    const weight = el("input", { type: "number", step: "0.1", value: s.weight, id: "weight-" + s.name });
    weight.addEventListener("input", () => { s.weight = weight.value; });
    const category = el("select", { id: "category-" + s.name }, [el("option", { value: "", textContent: "(none)" })]);
    for (const c of settings.categories) category.append(el("option", { value: c, textContent: c }));
    category.value = s.category || "";
    category.addEventListener("change", () => { s.category = category.value; });
    const up = el("button", { type: "button", textContent: "↑", title: "earlier" });
    up.addEventListener("click", () => { if (k > 0) { [selected[k - 1], selected[k]] = [selected[k], selected[k - 1]]; renderSelected(); } });
    const down = el("button", { type: "button", textContent: "↓", title: "later" });
    down.addEventListener("click", () => { if (k < selected.length - 1) { [selected[k + 1], selected[k]] = [selected[k], selected[k + 1]]; renderSelected(); } });
    const remove = el("button", { type: "button", textContent: "✕", title: "remove" });
    remove.addEventListener("click", () => {
      selected.splice(k, 1);
      if (!s.file && catalog[s.name]) setTriggers(catalog[s.name].triggers || [], false);
      renderSelected(); renderCatalog();
    });
    const label = el("td", { textContent: s.name + (s.file ? " (" + s.file + ")" : "") });
    body.append(el("tr", {}, [el("td", { textContent: String(k + 1) }), label, el("td", {}, [weight]),
      el("td", {}, [category]), el("td", {}, [up, down, remove])]));
  });
}
$("add-path-button").addEventListener("click", () => {
  const file = $("add-path").value.trim();
  if (!file) return;
  const stem = file.split(/[\\/]/).pop().replace(/\.[^.]*$/, "");
  selected.push({ name: stem, file, weight: 1.0, category: "" });
  $("add-path").value = ""; renderSelected();
});

// ------------------------------------------------------------------ form
function numberOrText(id) {
  const text = $(id).value.trim();
  if (text === "") return text;
  const value = Number(text);
  return Number.isFinite(value) ? value : text;
}
function request() {
  return {
    loras: selected.map((s) => ({ name: s.name, file: s.file || null, weight: Number(s.weight),
                                  category: s.category || null, triggers: s.triggers || [] })),
    methods: settings.methods.filter((m) => $("method-" + m).checked),
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    seed: numberOrText("seed"), steps: numberOrText("steps"), width: numberOrText("width"),
    height: numberOrText("height"), guidance: numberOrText("guidance"), lora_scale: numberOrText("lora_scale"),
    profile: $("profile").value, options: $("options").value,
  };
}
function fillForm(form) {
  selected = [];
  for (const l of form.loras || []) {
    const inCatalog = catalog[l.name] !== undefined;
    selected.push({ name: l.name, file: inCatalog ? null : l.file, weight: l.weight, category: l.category || "",
                    triggers: inCatalog ? [] : (l.triggers || []) });
  }
  for (const m of settings.methods) $("method-" + m).checked = (form.methods || []).includes(m);
  for (const key of ["prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance", "lora_scale"]) {
    if (form[key] !== undefined && form[key] !== null) $(key).value = form[key];
  }
  $("options").value = form.options && Object.keys(form.options).length ? JSON.stringify(form.options) : "";
  $("profile").value = "";
  renderSelected(); renderCatalog();
}
$("fill").addEventListener("click", async () => {
  try { showError(""); fillForm((await api("/api/parse-record", { text: $("record").value })).form); }
  catch (e) { showError(e.message); }
});
$("record-file").addEventListener("change", () => {
  const file = $("record-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = async () => {
    try {
      showError("");
      const body = file.name.toLowerCase().endsWith(".json") ? { text: new TextDecoder().decode(reader.result) }
        : { png_base64: btoa(Array.from(new Uint8Array(reader.result), (b) => String.fromCharCode(b)).join("")) };
      fillForm((await api("/api/parse-record", body)).form);
    } catch (e) { showError(e.message); }
  };
  reader.readAsArrayBuffer(file);
});

// ------------------------------------------------------------------ jobs
$("generate").addEventListener("click", async () => {
  showError("");
  try {
    const job = await api("/api/jobs", request());
    jobId = job.id; shown = 0;
    $("results").textContent = ""; $("progress").textContent = "";
    $("generate").disabled = true; $("cancel").disabled = false;
    $("status").textContent = "queued";
    timer = setInterval(poll, 300); poll();
  } catch (e) { showError(e.message); }
});
$("cancel").addEventListener("click", async () => {
  if (jobId) { try { await api("/api/jobs/" + jobId + "/cancel", {}); } catch (e) { showError(e.message); } }
});
function stopPolling() {
  clearInterval(timer); timer = null;
  $("generate").disabled = false; $("cancel").disabled = true;
}
async function poll() {
  if (!jobId || polling) return;  // a slow answer must not overlap the next tick (cards would repeat)
  let status;
  polling = true;
  try { status = await api("/api/jobs/" + jobId); } catch (e) { showError(e.message); stopPolling(); return; }
  finally { polling = false; }
  $("status").textContent = "job " + status.id + ": " + status.state;
  $("status").dataset.state = status.state;
  const box = $("progress"); box.textContent = "";
  for (const m of status.methods) {
    box.append(el("div", { className: "prog" }, [
      el("span", { textContent: m.label }),
      el("progress", { max: m.total, value: m.step, id: "progress-" + m.label }),
      el("span", { textContent: m.step + "/" + m.total + " " + m.state })]));
  }
  for (; shown < status.results.length; shown++) $("results").append(card(status.results[shown]));
  if (status.state === "error") showError(status.error);
  if (["done", "cancelled", "error"].includes(status.state)) stopPolling();
}
function card(r) {
  const gmac = (r.macs / 1e9).toFixed(r.macs < 1e9 ? 4 : 2);
  const use = el("button", { type: "button", textContent: "use these settings" });
  use.addEventListener("click", () => { fillForm(r.form); window.scrollTo(0, 0); });
  return el("div", { className: "result", id: "result-" + r.method_label }, [
    el("h3", { textContent: r.method_label }),
    el("img", { src: r.image_url, alt: r.method_label + " seed " + r.seed }),
    el("div", { className: "calls", textContent: r.full_calls + " full + " + r.cached_calls + " cached UNet calls" }),
    el("div", { className: "cost", textContent: gmac + " GMAC · " + r.seconds.toFixed(2) + " s" }),
    el("div", { className: "row" }, [
      el("a", { href: r.image_url + "?download=" + encodeURIComponent(r.download_name), textContent: "PNG + record" }),
      el("a", { href: r.record_url + "?download=" + encodeURIComponent(r.download_name), textContent: "JSON record" }),
      use])]);
}

// ------------------------------------------------------------------ start
(async () => {
  try {
    settings = await api("/api/settings");
    catalog = {};
    for (const l of (await api("/api/loras")).loras) catalog[l.name] = l;
  } catch (e) { showError("could not load the app's settings: " + e.message); return; }
  $("model").textContent = "model: " + settings.base;
  $("note").textContent = settings.note || "";
  $("lora-source").textContent = settings.lora_dir ? "from " + settings.lora_dir : "the model's own LoRAs";
  const d = settings.defaults;
  for (const key of ["seed", "steps", "width", "height", "guidance", "lora_scale"]) $(key).value = d[key];
  $("prompt").value = settings.base_prompt; $("negative_prompt").value = settings.negative_prompt;
  for (const m of settings.methods) {
    $("methods").append(el("label", {}, [el("input", { type: "checkbox", id: "method-" + m, checked: d.methods.includes(m) }), " " + m]));
  }
  renderCatalog(); renderSelected();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
