// The page's edit form (loaded after app.js, whose helpers it uses): the chosen image on a canvas at the model's
// size, a mask painted over it with the pointer, both sent to POST /v1/images/edits as OpenAI's images.edit sends
// them: the mask's painted pixels transparent (regenerate), every other pixel opaque (kept). On a video model: a
// clip's first frame at the clip's size, the mp4 as chosen and the mask painted on that frame (for every frame) sent
// to POST /v1/videos/edits, whose masks are white = regenerate; with no mask, an edit from the prompt in From.
"use strict";

// painted: one byte per pixel of the canvas (1 = regenerate); last: the pointer's previous point while painting.
const edit = { file: null, image: null, painted: null, width: 0, height: 0, last: null };
const MASK_COLOR = [255, 59, 48];

function modelSize() {
  const [width, height] = $("size").value.split("x").map(Number);
  return width > 0 && height > 0 ? [width, height] : null;
}

async function chooseImage() {
  $("editerror").textContent = "";
  edit.file = $("editfile").files[0] || null;
  edit.image = null;
  await showImage();
}

// A clip's first frame, on a canvas of the clip's size.
async function firstFrame(file) {
  const video = Object.assign(document.createElement("video"), { muted: true, preload: "auto" });
  video.src = URL.createObjectURL(file);
  try {
    await new Promise((resolve, reject) => {
      video.onloadeddata = resolve;
      video.onerror = reject;
    });
    const canvas = Object.assign(document.createElement("canvas"), { width: video.videoWidth,
                                                                     height: video.videoHeight });
    canvas.getContext("2d").drawImage(video, 0, 0);
    return canvas;
  } finally {
    URL.revokeObjectURL(video.src);
  }
}

// The file once the model is known (a server with a key answers once the key is given): an image, or on a video
// model a clip's first frame.
async function showImage() {
  rememberKey();
  try {
    await connected();
  } catch (err) {
    $("editerror").textContent = err.message;
    return;
  }
  const file = edit.file;
  if (file && !edit.image) {
    try {
      edit.image = state.kind === "video" ? await firstFrame(file) : await createImageBitmap(file);
    } catch {
      $("editerror").textContent = state.kind === "video"
        ? `${file.name} is not a clip this browser can play: choose an mp4`
        : `${file.name} is not an image this browser can read: choose a PNG, JPEG or WebP`;
    }
  }
  drawImage();
}

// The image stretched to the model's size (what the server edits), or a clip's frame at its own size (an edited clip
// keeps it), and an empty mask; again when the size changes.
function drawImage() {
  const size = state.kind === "video" && edit.image ? [edit.image.width, edit.image.height] : modelSize();
  edit.painted = null;
  $("editarea").style.display = edit.image && size ? "block" : "none";
  if (!edit.image || !size) return;
  [edit.width, edit.height] = size;
  for (const canvas of [$("editimage"), $("editmask")]) {
    Object.assign(canvas, { width: edit.width, height: edit.height });
  }
  const context = $("editimage").getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(edit.image, 0, 0, edit.width, edit.height);
  $("editarea").style.aspectRatio = `${edit.width} / ${edit.height}`;
  edit.painted = new Uint8Array(edit.width * edit.height);
  showMask();
}

function showMask() {
  const shown = new ImageData(edit.width, edit.height);
  edit.painted.forEach((on, i) => { if (on) shown.data.set([...MASK_COLOR, 255], 4 * i); });
  $("editmask").getContext("2d").putImageData(shown, 0, 0);
}

function brushRadius() {
  const size = Number($("brush").value);
  return Number.isFinite(size) ? Math.min(64, Math.max(1, size)) / 2 : 0.5;
}

// Paints every pixel whose centre lies within the brush's radius of the segment a-b (canvas pixels): no
// anti-aliasing, so the mask is exactly the stroke.
function paintSegment([ax, ay], [bx, by]) {
  const r = brushRadius();
  const dx = bx - ax, dy = by - ay, length2 = dx * dx + dy * dy;
  const x0 = Math.max(0, Math.floor(Math.min(ax, bx) - r));
  const x1 = Math.min(edit.width - 1, Math.ceil(Math.max(ax, bx) + r));
  const y0 = Math.max(0, Math.floor(Math.min(ay, by) - r));
  const y1 = Math.min(edit.height - 1, Math.ceil(Math.max(ay, by) + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const px = x + 0.5, py = y + 0.5;
      const t = length2 ? Math.min(1, Math.max(0, ((px - ax) * dx + (py - ay) * dy) / length2)) : 0;
      const ex = px - ax - t * dx, ey = py - ay - t * dy;
      if (ex * ex + ey * ey <= r * r) edit.painted[y * edit.width + x] = 1;
    }
  }
}

function canvasPoint(event) {
  const rect = $("editmask").getBoundingClientRect();
  return [(event.clientX - rect.left) * edit.width / rect.width,
          (event.clientY - rect.top) * edit.height / rect.height];
}

function paint(event) {
  if (!edit.painted || (event.type === "pointermove" ? !edit.last : event.button !== 0)) return;
  if (event.type === "pointerdown") $("editmask").setPointerCapture(event.pointerId);
  const point = canvasPoint(event);
  paintSegment(edit.last || point, point);
  edit.last = point;
  showMask();
}

function changeMask(change) {
  if (!edit.painted) return;
  edit.painted = edit.painted.map(change);
  showMask();
}

function png(canvas) {
  return new Promise((resolve, reject) => canvas.toBlob(
    (blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode the image"))), "image/png"));
}

// OpenAI's mask for an image: alpha 0 where painted (regenerate), 255 elsewhere (keep); for a clip, the video
// endpoint's: opaque white where painted (regenerate), opaque black elsewhere (keep).
function maskPng() {
  const canvas = Object.assign(document.createElement("canvas"), { width: edit.width, height: edit.height });
  const mask = new ImageData(edit.width, edit.height);
  const video = state.kind === "video";
  edit.painted.forEach((on, i) => mask.data.set(video ? [255 * on, 255 * on, 255 * on, 255] : [0, 0, 0, on ? 0 : 255],
                                                4 * i));
  canvas.getContext("2d").putImageData(mask, 0, 0);
  return png(canvas);
}

async function submitEdit(event) {
  event.preventDefault();
  $("editerror").textContent = "";
  rememberKey();
  if (!edit.painted) {
    $("editerror").textContent = `choose ${state.kind === "video" ? "a clip" : "an image"} to edit first`;
    return;
  }
  $("edit").disabled = true;
  try {
    await connected();
    const form = new FormData();
    if (state.kind === "video") {
      form.append("video", edit.file, edit.file.name);  // as chosen: the server reads every frame of it
      if (edit.painted.some((on) => on)) form.append("mask", await maskPng(), "mask.png");
      else if ($("editfrom").value) form.append("from_prompt", $("editfrom").value);  // left empty: the server asks
    } else {
      form.append("image", await png($("editimage")), "image.png");
      form.append("mask", await maskPng(), "mask.png");
      form.append("wait", "false");  // the job at once: its card follows its progress, as a generation's does
    }
    form.append("prompt", $("editprompt").value);
    if (number("editseed") !== undefined) form.append("seed", String(number("editseed")));
    const path = state.kind === "video" ? "/v1/videos/edits" : "/v1/images/edits";
    follow((await api(path, { method: "POST", body: form })).id);
  } catch (err) {
    $("editerror").textContent = err.message;
  } finally {
    $("edit").disabled = false;
  }
}

$("editfile").addEventListener("change", chooseImage);
$("key").addEventListener("change", () => { if (edit.file && !edit.painted) showImage(); });
$("size").addEventListener("change", drawImage);
for (const type of ["pointerdown", "pointermove"]) $("editmask").addEventListener(type, paint);
for (const type of ["pointerup", "pointercancel"]) $("editmask").addEventListener(type, () => { edit.last = null; });
$("clearmask").addEventListener("click", () => changeMask(() => 0));
$("invertmask").addEventListener("click", () => changeMask((on) => 1 - on));
$("editform").addEventListener("submit", submitEdit);
