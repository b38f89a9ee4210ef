"""The page at GET /: choose or drop an image, or click a sample, and see it with the model's top 3
classes as bars.

One self-contained HTML document (the samples inside it as data: URIs, nothing fetched from
elsewhere). It POSTs the image's bytes as they are to /predict, so the server decodes it as it
decodes any request.
"""

import base64
import html
import json
import re
from importlib.resources import files

# The first image of each class in Fashion-MNIST's test set (Zalando Research, MIT license), as
# 28x28 grayscale PNGs named by label: base64, ready for data: URIs.
SAMPLES: tuple[str, ...] = tuple(
    base64.b64encode((files("fmnist.serve") / "samples" / f"{label}.png").read_bytes()).decode() for label in range(10)
)


def page(class_names: tuple[str, ...], checkpoint: str) -> str:
    """The page, naming the classes of the model it talks to and the checkpoint that answers."""
    values = {
        # "<" escaped so that no class name can end the script it sits in.
        "CLASS_NAMES": json.dumps(list(class_names)).replace("<", "\\u003c"),
        "CHECKPOINT": html.escape(checkpoint),
        "SAMPLES": "\n".join(_sample_button(label, name) for label, name in enumerate(class_names[:len(SAMPLES)])),
    }
    # One pass, so that no value is searched for the placeholders of another.
    return re.sub(r"__(CLASS_NAMES|CHECKPOINT|SAMPLES)__", lambda m: values[m[1]], _PAGE)


def _sample_button(label: int, name: str) -> str:
    return (f'<button type="button" data-label="{label}" title="{html.escape(name)}: classify this sample">'
            f'<img src="data:image/png;base64,{SAMPLES[label]}" alt="">'
            f'<span>{html.escape(name)}</span></button>')


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fmnist: try an image</title>
<style>
  body { font: 16px system-ui, sans-serif; max-width: 40rem; margin: 1.25rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.6rem; margin: 0 0 0.25rem; }
  .hint { margin: 0 0 1rem; color: #555; }
  #drop { display: block; border: 2px dashed #888; border-radius: 8px; padding: 1rem; text-align: center;
          cursor: pointer; }
  #drop.over { background: #eef4ff; border-color: #36c; }
  #samples { display: grid; grid-template-columns: repeat(10, 1fr); gap: 4px; margin-top: 1rem; }
  #samples button { display: flex; flex-direction: column; align-items: center; gap: 4px; padding: 3px 0;
                    border: 2px solid transparent; border-radius: 6px; background: none; cursor: pointer;
                    font: 0.7rem/1.15 system-ui, sans-serif; color: #444; white-space: nowrap; }
  #samples button:hover, #samples button:focus-visible { border-color: #9ab; }
  #samples button[aria-pressed="true"] { border-color: #36c; background: #eef4ff; }
  #samples img { width: 56px; height: 56px; image-rendering: pixelated; background: #000; border-radius: 4px; }
  #shown { display: flex; gap: 1.5rem; align-items: center; margin-top: 1.5rem; }
  #preview { width: 140px; height: 140px; object-fit: contain; image-rendering: pixelated;
             background: #000; border-radius: 4px; }
  #bars { flex: 1; }
  .row { margin: 0.4rem 0; }
  .name { display: flex; justify-content: space-between; font-size: 0.95rem; }
  .track { background: #e6e6e6; border-radius: 3px; height: 14px; }
  .fill { background: #36c; border-radius: 3px; height: 14px; }
  #error { color: #b00; margin-top: 1rem; }
  #checkpoint { color: #666; font-size: 0.8rem; overflow-wrap: anywhere; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>Fashion-MNIST classifier</h1>
<p class="hint">Click a sample from the test set, or try an image of your own.</p>
<label id="drop">Choose or drop a PNG/JPEG image
  <input id="file" type="file" accept="image/png,image/jpeg" hidden>
</label>
<div id="samples">
__SAMPLES__
</div>
<div id="shown" hidden>
  <img id="preview" alt="the image sent">
  <div id="bars"></div>
</div>
<p id="error" hidden></p>
<p id="checkpoint">checkpoint: __CHECKPOINT__</p>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const samples = document.getElementById("samples");

async function classify(file) {
  document.body.dataset.state = "busy";
  const error = document.getElementById("error"), bars = document.getElementById("bars");
  error.hidden = true;
  document.getElementById("preview").src = URL.createObjectURL(file);
  try {
    // The file's bytes as they are; a type the server does not take gets its one-line answer.
    const response = await fetch("predict", {method: "POST", body: file,
                                             headers: {"Content-Type": file.type || "application/octet-stream"}});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    const top = answer.probabilities.map((p, k) => [p, k]).sort((a, b) => b[0] - a[0]).slice(0, 3);
    bars.replaceChildren(...top.map(([p, k]) => {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.label = k;
      row.innerHTML = '<div class="name"><span class="class"></span><span class="percent"></span></div>' +
                      '<div class="track"><div class="fill"></div></div>';
      row.querySelector(".class").textContent = CLASSES[k];
      row.querySelector(".percent").textContent = (100 * p).toFixed(1) + "%";
      row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
      return row;
    }));
    document.getElementById("checkpoint").textContent = "checkpoint: " + answer.checkpoint;
    document.getElementById("shown").hidden = false;
  } catch (e) {
    document.getElementById("shown").hidden = true;
    error.textContent = "Error: " + e.message;
    error.hidden = false;
  }
  document.body.dataset.state = "done";
}

const CLASSES = __CLASS_NAMES__;  // the checkpoint's, filled in by the server

// The sample being shown, marked; none for a file of one's own.
function mark(chosen) {
  for (const button of samples.querySelectorAll("button")) button.setAttribute("aria-pressed", button === chosen);
}

samples.addEventListener("click", async e => {
  const button = e.target.closest("button");
  if (!button) return;
  mark(button);
  // The sample's PNG bytes (a Blob of type image/png), sent as a chosen file is.
  classify(await (await fetch(button.querySelector("img").src)).blob());
});
input.addEventListener("change", () => { mark(null); input.files[0] && classify(input.files[0]); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) { mark(null); classify(e.dataTransfer.files[0]); }
});
</script>
</body>
</html>
"""
