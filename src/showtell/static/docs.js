"use strict";
// A small offline reader of /openapi.json (FastAPI's default /docs loads Swagger UI from a CDN).
const main = document.getElementById("docs");
for (const pre of main.querySelectorAll("pre")) pre.textContent = pre.textContent.replaceAll("HOST", location.host);

function add(parent, tag, text, cls) {
  const el = document.createElement(tag);
  if (text) el.textContent = text;
  if (cls) el.className = cls;
  parent.append(el);
  return el;
}

fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const card = add(main, "section", "", "card");
      const text = add(card, "div", "", "text");
      add(text, "p", `${method.toUpperCase()} ${path}`, "caption");
      if (op.summary) add(text, "p", op.summary);
      if (op.description) add(text, "p", op.description, "muted");
      const body = op.requestBody && op.requestBody.content;
      if (body) add(text, "p", "body: " + Object.keys(body).join(", "), "muted");
      add(text, "p", "responses: " + Object.keys(op.responses || {}).join(", "), "muted");
    }
  }
});
