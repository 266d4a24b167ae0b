"""The search page served at ``GET /`` (one self-contained HTML document, no external assets).

It calls the same API as every other client: ``POST v1/search`` and
``GET v1/images/{image_id}`` (fetched with the API key, shown as blob URLs), and draws
each answer's box as an SVG rectangle over the image, in the image's pixel coordinates
(the browser shows a photo EXIF-upright, the orientation its boxes were indexed in).
The "image" field narrows the search to one image id or a folder (an ``image_id``
prefix filter). URLs are relative to the page, so it works under any Serve route prefix.
"""

from __future__ import annotations

SEARCH_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reir search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
  form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin-bottom: 1rem; }
  #q { flex: 1 1 24rem; font-size: 1.1rem; padding: .4rem; }
  #status { color: #666; margin: .5rem 0; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
  .frame { position: relative; line-height: 0; }
  .frame img { width: 100%; height: auto; display: block; }
  .frame svg { position: absolute; inset: 0; width: 100%; height: 100%; }
  .frame rect { fill: none; stroke: #00e5ff; stroke-width: 3; vector-effect: non-scaling-stroke;
                filter: drop-shadow(0 0 1px #000); }
  .meta { font-size: .85rem; margin-top: .4rem; line-height: 1.3; word-break: break-all; }
  .score { font-weight: 600; }
</style>
</head>
<body>
<h1>reir: find the instance you describe</h1>
<form id="search">
  <input id="q" name="q" type="search" placeholder="the small red circle left of the blue square" required
         maxlength="500" autofocus>
  <label>top <input id="k" type="number" min="1" max="100" value="10" style="width:4rem"></label>
  <label><input id="discover" type="checkbox"> discovery mode (every image that holds it)</label>
  <label><input id="rerank" type="checkbox" checked> re-rank</label>
  <input id="image" type="search" placeholder="image id or folder (optional)" maxlength="256"
         title="only images whose id starts with this, e.g. 2024/a_trip/ or one image's id">
  <input id="key" type="password" placeholder="API key (if required)" autocomplete="off">
  <button type="submit">Search</button>
</form>
<div id="status"></div>
<div id="results"></div>
<button id="more" type="button" hidden>more</button>
<script>
"use strict";
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
$("key").value = sessionStorage.getItem("reir_key") || "";

function headers() {
  const key = $("key").value.trim();
  sessionStorage.setItem("reir_key", key);
  return key ? {"Authorization": "Bearer " + key} : {};
}

async function loadImage(img, imageId) {
  // Ids from folders hold "/": each segment is encoded, the slashes stay path separators.
  const path = imageId.split("/").map(encodeURIComponent).join("/");
  const resp = await fetch(base + "v1/images/" + path, {headers: headers()});
  if (!resp.ok) { img.alt = "image unavailable (" + resp.status + ")"; return; }
  img.src = URL.createObjectURL(await resp.blob());
}

function card(result, rank) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.imageId = result.image_id;
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = result.image_id;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("preserveAspectRatio", "none");
  const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
  const [x, y, w, h] = result.box;
  rect.setAttribute("x", x); rect.setAttribute("y", y);
  rect.setAttribute("width", w); rect.setAttribute("height", h);
  svg.appendChild(rect);
  img.addEventListener("load", () => {
    svg.setAttribute("viewBox", "0 0 " + img.naturalWidth + " " + img.naturalHeight);
    el.dataset.loaded = "1";
  });
  frame.append(img, svg);
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = "#" + rank + "  " + result.score.toFixed(3);
  meta.append(score, document.createElement("br"), document.createTextNode(result.image_id),
              document.createElement("br"), document.createTextNode("[" + result.box.map(Math.round).join(", ") + "]"));
  el.append(frame, meta);
  loadImage(img, result.image_id);
  return el;
}

let page = null;  // the last request's body and how many results are shown

async function fetchPage(body) {
  let resp;
  try {
    resp = await fetch(base + "v1/search", {method: "POST", body: JSON.stringify(body),
                                            headers: {"Content-Type": "application/json", ...headers()}});
  } catch (err) { $("status").textContent = "network error: " + err; return null; }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const detail = Array.isArray(data.detail) ? data.detail.map(d => d.field + ": " + d.message).join("; ") : "";
    $("status").textContent = "error " + resp.status + ": " + (data.error || "") + (detail ? " (" + detail + ")" : "");
    return null;
  }
  return data;
}

function show(data) {
  data.results.forEach((r) => $("results").appendChild(card(r, ++page.shown)));
  $("status").textContent = (data.mode === "discover"
      ? data.total + " image(s) hold it (threshold " + data.threshold.toFixed(2)
        + (data.gate ? ", gate " + data.gate.toFixed(2) : "") + "), " + page.shown + " shown"
      : page.shown + " result(s)") + "; last page in " + data.took_ms.toFixed(0) + " ms"
      + (data.reranked ? ", re-ranked" : "") + (data.truncated ? " (query too long: its end was ignored)" : "");
  page.body.offset = data.next_offset;
  $("more").hidden = data.next_offset === null || data.next_offset === undefined;
}

$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {query: $("q").value, top_k: Number($("k").value) || 10,
                mode: $("discover").checked ? "discover" : "rank", rerank: $("rerank").checked};
  const image = $("image").value.trim();
  if (image) body.filters = [{field: "image_id", op: "prefix", value: image}];
  $("status").textContent = "searching...";
  $("results").replaceChildren();
  $("more").hidden = true;
  page = {body: body, shown: 0};
  const data = await fetchPage(body);
  if (data) show(data);
});

$("more").addEventListener("click", async () => {
  if (!page || page.body.offset === null) return;
  const data = await fetchPage(page.body);
  if (data) show(data);
});
</script>
</body>
</html>
"""
