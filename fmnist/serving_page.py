"""The page at GET /: choose or drop an image, see it with the model's top 3 classes as bars.

One self-contained HTML document (no files to package, nothing fetched from elsewhere). It POSTs
the file as it is to /predict, so the server decodes it as it decodes any request.
"""

import json


def page(class_names: tuple[str, ...]) -> str:
    """The page, naming the classes of the model it talks to."""
    return _PAGE.replace("__CLASS_NAMES__", json.dumps(list(class_names)))


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fmnist: try an image</title>
<style>
  body { font: 16px system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.5rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef4ff; border-color: #36c; }
  #shown { display: flex; gap: 1.5rem; align-items: center; margin-top: 1.5rem; }
  #preview { width: 140px; height: 140px; object-fit: contain; image-rendering: pixelated;
             background: #000; border-radius: 4px; }
  #bars { flex: 1; }
  .row { margin: 0.4rem 0; }
  .name { display: flex; justify-content: space-between; font-size: 0.95rem; }
  .track { background: #e6e6e6; border-radius: 3px; height: 14px; }
  .fill { background: #36c; border-radius: 3px; height: 14px; }
  #error { color: #b00; margin-top: 1rem; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>Fashion-MNIST classifier</h1>
<label id="drop">Choose or drop a PNG/JPEG image
  <input id="file" type="file" accept="image/png,image/jpeg" hidden>
</label>
<div id="shown" hidden>
  <img id="preview" alt="the image sent">
  <div id="bars"></div>
</div>
<p id="error" hidden></p>
<p id="checkpoint" style="color:#666;font-size:0.8rem"></p>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");

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
input.addEventListener("change", () => input.files[0] && classify(input.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
