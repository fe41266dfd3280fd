"use strict";
// Each photo is its own POST /v1/caption; photos sent together are captioned as one batch by the server.
const results = document.getElementById("results");
const template = document.getElementById("card");
const drop = document.getElementById("drop");
const picker = document.getElementById("picker");

function score(s) {
  const span = document.createElement("span");
  span.className = "score";
  span.textContent = ` (${s.toFixed(2)})`;
  return span;
}

async function caption(file, before) {
  const card = template.content.firstElementChild.cloneNode(true);
  const img = card.querySelector("img");
  const field = (name) => card.querySelector("." + name);
  field("name").textContent = file.name;
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  img.onerror = () => { img.replaceWith("no preview"); };
  results.insertBefore(card, before);
  let body;
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    const response = await fetch("/v1/caption", { method: "POST", body: form });
    body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok && !body.error) body = { error: `HTTP ${response.status}` };
  } catch (e) {
    body = { error: `request failed: ${e.message}` };
  }
  card.classList.remove("pending");
  if (body.error) {
    card.classList.add("error");
    field("caption").remove();
    field("error").hidden = false;
    field("error").textContent = body.error;
    return;
  }
  card.classList.add("ok");
  field("caption").textContent = body.caption;
  if (body.attention) words(card, field("caption"), body.attention);
  field("caption").append(score(body.score));
  if (body.confidence != null) {
    const span = document.createElement("span");
    span.className = "confidence";
    span.textContent = `confidence ${Math.round(body.confidence * 100)}%`;
    field("caption").append(" ", span);
  }
  if (body.model_caption) {  // a sure tag overruled the model's own caption; show that one too
    const own = document.createElement("div");
    own.className = "own";
    own.textContent = `the model's own caption: ${body.model_caption}`;
    field("caption").after(own);
  }
  for (const tag of body.tags || []) {  // the encoder's ImageNet classes, most probable first
    const li = document.createElement("li");
    li.textContent = `${tag.label} ${Math.round(tag.p * 100)}%`;
    li.title = `ImageNet class, probability ${tag.p}`;
    field("tags").append(li);
  }
  if (body.tags_note) {  // why this model gives no tags
    const li = document.createElement("li");
    li.className = "note";
    li.textContent = body.tags_note;
    field("tags").append(li);
  }
  for (const alt of body.alternatives) {
    const li = document.createElement("li");
    li.textContent = alt.caption;
    li.append(score(alt.score));
    field("alternatives").append(li);
  }
  field("meta").textContent = `${body.model} · ${Math.round(body.elapsed_ms)} ms`;
}

// An attention model's caption: each word lights, on hover, where the model looked for it on the photo.
function words(card, caption, att) {
  caption.textContent = "";
  att.words.forEach((word, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = word;
    span.title = `where the model looked for "${word}"`;
    span.addEventListener("mouseenter", () => showMap(card, att, i));
    span.addEventListener("mouseleave", () => { card.querySelector("canvas.where").hidden = true; });
    caption.append(span, i + 1 < att.words.length ? " " : "");
  });
}

function showMap(card, att, i) {
  const img = card.querySelector("img");
  const canvas = card.querySelector("canvas.where");
  if (!img) return;  // no preview of this photo
  const w = img.clientWidth, h = img.clientHeight;
  Object.assign(canvas, { width: w, height: h, hidden: false });
  Object.assign(canvas.style, { left: `${img.offsetLeft}px`, top: `${img.offsetTop}px` });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "rgba(0, 0, 0, 0.75)";  // dim the photo, then light the crop the encoder saw by the map
  ctx.fillRect(0, 0, w, h);
  const values = att.maps[i].flat(), g = att.maps[i].length, peak = Math.max(...values) || 1;
  const side = Math.min(w, h) * att.crop_pct, x = (w - side) / 2, y = (h - side) / 2;
  const small = document.createElement("canvas");
  small.width = small.height = g;
  const shade = small.getContext("2d").createImageData(g, g);
  values.forEach((v, k) => { shade.data[4 * k + 3] = Math.round(255 * 0.75 * (1 - v / peak)); });
  small.getContext("2d").putImageData(shade, 0, 0);
  ctx.clearRect(x, y, side, side);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, x, y, side, side);
}

function captionAll(files) {
  const before = results.firstChild;  // newest selection on top, in the order chosen
  for (const file of files) caption(file, before);
}

picker.addEventListener("change", () => { captionAll(picker.files); picker.value = ""; });
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => { e.preventDefault(); captionAll(e.dataTransfer.files); });

fetch("/v1/model").then((r) => r.json()).then((m) => {
  document.getElementById("model").textContent = `model ${m.name} · encoder ${m.encoder} · ${m.vocab_size} words`;
}).catch(() => {});
