"use strict";
// The page of `miniclip serve`. Text from users, files or the server (captions, file names, paths, errors)
// is only ever set with textContent, never innerHTML, so no caption can become markup or script.

const $ = (id) => document.getElementById(id);
const MIN_CAPTIONS = 2, MAX_CAPTIONS = 8, START_CAPTIONS = 3;
const EXAMPLES = ["a dog running on the grass", "a child playing in the water", "a man riding a bike"];
let health = null, image = null, timer = null, latestClassify = 0, latestSearch = 0;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);  // strings become text nodes
  return node;
}

function footer(ms) {
  const parts = [`model ${health.model}`, health.backend_label];
  if (health.photos) parts.push(`${health.photo_count} photos`);
  if (ms !== undefined) parts.push(`last request ${Math.round(ms)} ms`);
  $("footer").textContent = parts.join(" · ");
}

async function call(url, options) {
  // -> the parsed JSON; throws an Error with the server's message; the footer shows the round trip.
  const start = performance.now();
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the server does not answer; is `miniclip serve` still running?");
  }
  if (health) footer(performance.now() - start);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// --- tabs ------------------------------------------------------------------------------------------------
function showTab(name) {
  for (const tab of ["classify", "search"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`${tab}-panel`).hidden = tab !== name;
  }
}
$("tab-classify").addEventListener("click", () => showTab("classify"));
$("tab-search").addEventListener("click", () => { showTab("search"); $("query").focus(); });
const activeTab = () => ($("search-panel").hidden ? "classify" : "search");

// --- classify --------------------------------------------------------------------------------------------
function addCaption() {
  const boxes = $("captions");
  if (boxes.children.length >= MAX_CAPTIONS) return;
  const n = boxes.children.length;
  const input = el("input", { type: "text", maxLength: 1000, placeholder: EXAMPLES[n] || `caption ${n + 1}` });
  input.addEventListener("input", schedule);
  const remove = el("button", { type: "button", className: "small", title: "remove this caption" }, "×");
  const row = el("div", {}, input, remove);
  remove.addEventListener("click", () => {
    if (boxes.children.length > MIN_CAPTIONS) { row.remove(); updateButtons(); schedule(); }
  });
  boxes.append(row);
  updateButtons();
}

function updateButtons() {
  const n = $("captions").children.length;
  $("add-caption").disabled = n >= MAX_CAPTIONS;
  for (const button of $("captions").querySelectorAll("button")) button.disabled = n <= MIN_CAPTIONS;
}

const captions = () => [...$("captions").querySelectorAll("input")].map((i) => i.value.trim()).filter(Boolean);

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(classify, 250);
}

async function classify() {
  const texts = captions();
  if (!image) return;
  if (texts.length < MIN_CAPTIONS) {
    $("classify-error").textContent = "Type at least two captions.";
    return;
  }
  const form = new FormData();
  form.append("image", image, image.name || "pasted.png");
  for (const text of texts) form.append("captions", text);
  const mine = ++latestClassify;
  try {
    const result = await call("api/classify", { method: "POST", body: form });
    if (mine !== latestClassify) return;  // a newer request was sent meanwhile
    $("classify-error").textContent = "";
    drawBars(result.scores);
  } catch (e) {
    if (mine === latestClassify) $("classify-error").textContent = e.message;
  }
}

function drawBars(scores) {
  $("bars").replaceChildren(...scores.map((s) => {
    const percent = 100 * s.probability;
    const fill = el("span");
    fill.style.width = `${percent.toFixed(2)}%`;
    const row = el("div", { className: "row" },
      el("span", { className: "label", title: s.caption }, s.caption),
      el("div", { className: "bar" }, fill),
      el("span", { className: "value" }, `${percent.toFixed(1)}%`));
    row.dataset.probability = String(s.probability);
    return row;
  }));
}

async function setImage(file) {
  if (!file) return;
  image = file;
  $("classify-error").textContent = "";
  // The centre crop at the model's input size, as the server's resize_centre_crop makes it.
  const canvas = $("preview");
  try {
    const bitmap = await createImageBitmap(file);
    const size = health.image_size, side = Math.min(bitmap.width, bitmap.height);
    canvas.width = canvas.height = size;
    canvas.getContext("2d").drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side,
                                      0, 0, size, size);
    canvas.hidden = false;
    $("drop-hint").hidden = true;
    $("preview-note").textContent = `Shown as the model sees it: the centre crop, ${size}×${size} px.`;
  } catch (e) {
    canvas.hidden = true;
    $("drop-hint").hidden = false;  // the server says why it cannot read it
  }
  schedule();
}

$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("add-caption").addEventListener("click", () => { addCaption(); $("captions").lastChild.firstChild.focus(); });
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });

function dropTarget(node, onFile) {
  node.addEventListener("dragover", (e) => { e.preventDefault(); node.classList.add("over"); });
  node.addEventListener("dragleave", () => node.classList.remove("over"));
  node.addEventListener("drop", (e) => {
    e.preventDefault();
    node.classList.remove("over");
    onFile(e.dataTransfer.files[0]);
  });
}
dropTarget($("drop"), setImage);
dropTarget($("search-panel"), searchImage);
// A file dropped beside a target must not replace the page.
for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());

document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return;
  e.preventDefault();
  (activeTab() === "search" ? searchImage : setImage)(item.getAsFile());
});

// --- search ----------------------------------------------------------------------------------------------
function photoUrl(path) {
  // A result's path is under the served folder; the server answers only for files of its index.
  const root = health.photos;
  const rel = path.startsWith(root) ? path.slice(root.length).replace(/^[\\/]/, "") : path;
  return "photos/" + rel.split(/[\\/]/).map(encodeURIComponent).join("/");
}

function showResults(hits) {
  $("search-error").textContent = hits.length ? "" : "No photos in the index.";
  $("results").replaceChildren(...hits.map((hit) => {
    const url = photoUrl(hit.path);
    const name = hit.path.split(/[\\/]/).pop();
    const link = el("a", { href: url, target: "_blank", rel: "noopener", title: name },
      el("img", { src: `${url}?thumb=1`, alt: name, loading: "lazy" }));
    const figure = el("figure", {}, link, el("figcaption", {}, `${hit.rank}. ${hit.score.toFixed(3)} ${name}`));
    figure.dataset.score = String(hit.score);
    return figure;
  }));
}

async function runSearch(request) {
  const mine = ++latestSearch;
  try {
    const hits = await request();
    if (mine === latestSearch) showResults(hits);
  } catch (e) {
    if (mine === latestSearch) $("search-error").textContent = e.message;
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  runSearch(() => call(`api/search?q=${encodeURIComponent(query)}&top=${$("top").value}`));
});

function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  form.append("top", $("top").value);
  $("query").value = "";
  runSearch(() => call("api/search", { method: "POST", body: form }));
}

// --- start -----------------------------------------------------------------------------------------------
(async () => {
  try {
    health = await call("api/health");
  } catch (e) {
    $("footer").textContent = e.message;
    return;
  }
  footer();
  for (let i = 0; i < START_CAPTIONS; i++) addCaption();
  $("tab-search").hidden = !health.photos;
})();
