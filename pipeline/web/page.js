// The web page of an export (pipeline/web.py writes its folder): codes drawn in this browser from the run's stored
// mixture, decoded by the run's default decoder in ONNX Runtime Web. Same distribution as `python -m pipeline.sample`,
// with this page's own random numbers (a browser cannot replay torch's generator). A visitor's own picture: its faces
// found by OpenCV.js's CascadeClassifier as pipeline/faces.py finds them, encoded, and edited like any face; the
// picture never leaves the browser.
"use strict";

const $ = (id) => document.getElementById(id);
const GRID = 64, STRIP = 10, VARIATIONS = 8;
// a face: its code (before the sliders) and where it is shown; a and b: the ends of A -> B; edit: the face being
// edited (its hair chip moves it towards that colour, the sliders move it, and its variations are drawn around it)
const state = { model: null, session: null, prior: null, hair: {}, colour: null, codes: [], values: {}, a: null, b: null,
                edit: null, variations: [], uploads: [], draws: 0 };

function say(text) { $("message").textContent = text; }

class FileProblem extends Error {}

async function fetchFile(name, kind) {  // kind: "json", "bytes", or "head" (there or not, without its body)
  let response;
  try {
    response = await fetch(name, kind === "head" ? { method: "HEAD" } : {});
  } catch (err) {
    throw new FileProblem(`${name} could not be loaded (${err.message}): is the server still running?`);
  }
  if (!response.ok) {
    throw new FileProblem(`${name} could not be loaded (${response.status} ${response.statusText}): the folder is ` +
                          "incomplete; publish the whole web folder that `python -m pipeline.export` wrote");
  }
  if (kind === "head") return null;
  return kind === "json" ? response.json().catch(() => { throw new FileProblem(`${name} is damaged (not JSON): export the model again`); })
                         : response.arrayBuffer();
}

// a file the export gzipped (its name ends in .gz), unpacked here; a host that already undid the gzip is fine too
async function unpacked(name) {
  const bytes = new Uint8Array(await fetchFile(name, "bytes"));
  if (bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes.buffer;
  if (typeof DecompressionStream === "undefined") {
    throw new FileProblem(`This browser cannot unpack ${name} (it has no DecompressionStream): open the page in a ` +
                          "current Chrome, Edge, Firefox or Safari");
  }
  try {
    return await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer();
  } catch (err) {
    throw new FileProblem(`${name} is damaged (${err.message}): export the model again`);
  }
}

// ---------------------------------------------------------------- the model's files

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

function section(buffer, where, name) {
  const bytes = where.length * (where.dtype === "float16" ? 2 : 4);
  if (where.offset + bytes > buffer.byteLength || where.offset % 4) {
    throw new FileProblem(`prior.bin is damaged (${name} lies past its end): export the model again`);
  }
  if (where.dtype === "float32") return new Float32Array(buffer, where.offset, where.length);
  const halves = new Uint16Array(buffer, where.offset, where.length), out = new Float32Array(where.length);
  for (let i = 0; i < halves.length; i++) out[i] = halfToFloat(halves[i]);
  return out;
}

// a Gaussian mixture as the sampler needs it: cumulative weights, means, packed lower-triangular Cholesky factors
function mixture(buffer, entry, dim, name) {
  const k = entry.weights.length, tri = dim * (dim + 1) / 2;
  const means = section(buffer, entry.means, `${name} means`), factors = section(buffer, entry.cholesky, `${name} cholesky`);
  if (means.length !== k * dim || factors.length !== k * tri) {
    throw new FileProblem(`prior.bin does not match model.json (the ${name} sizes differ): export the model again`);
  }
  let total = 0;
  return { cumulative: entry.weights.map((w) => (total += w)), dim,
           means: Array.from({ length: k }, (_, i) => means.subarray(i * dim, (i + 1) * dim)),
           factors: Array.from({ length: k }, (_, i) => factors.subarray(i * tri, (i + 1) * tri)) };
}

// ---------------------------------------------------------------- sampling, seeded

function generator(seed) {  // mulberry32: a small seeded generator of uniforms in [0, 1)
  let a = (seed >>> 0) ^ 0x9e3779b9;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function normals(uniform, n) {  // Box-Muller
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - uniform())), angle = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(angle);
    if (i + 1 < n) out[i + 1] = r * Math.sin(angle);
  }
  return out;
}

// n codes: a component by its weight, then its mean + temperature * L eps
function sampleCodes(dist, n, seed, temperature) {
  const uniform = generator(seed), total = dist.cumulative[dist.cumulative.length - 1], dim = dist.dim, codes = [];
  for (let face = 0; face < n; face++) {
    const u = uniform() * total;
    let k = dist.cumulative.findIndex((c) => u < c);
    if (k < 0) k = dist.cumulative.length - 1;
    const eps = normals(uniform, dim), mean = dist.means[k], factor = dist.factors[k], z = new Float32Array(dim);
    for (let i = 0, row = 0; i < dim; row += ++i) {
      let sum = 0;
      for (let j = 0; j <= i; j++) sum += factor[row + j] * eps[j];
      z[i] = mean[i] + temperature * sum;
    }
    codes.push(z);
  }
  return codes;
}

function steered(code) {
  const z = Float32Array.from(code);
  for (const slider of state.model.sliders) {
    const v = state.values[slider.name] || 0;
    if (v) for (let i = 0; i < z.length; i++) z[i] += v * slider.direction[i];
  }
  return z;
}

// ---------------------------------------------------------------- decoding

// one run of an ONNX session at a time (the grid, the strip, the edited face and an upload may all ask at once)
let running = Promise.resolve();
function inTurn(job) {
  const turn = running.then(job);
  running = turn.catch(() => {});
  return turn;
}

function decodePixels(codes) {  // -> Float32Array n x 3 x H x W of pixel means in [0, 1]
  const dim = state.model.latent_dim, flat = new Float32Array(codes.length * dim);
  codes.forEach((z, i) => flat.set(z, i * dim));
  return inTurn(async () => (await state.session.run({ z: new ort.Tensor("float32", flat, [codes.length, dim]) })).pixels.data);
}

function toUint8(value) { return Math.min(255, Math.max(0, Math.round(value * 255))); }

function paint(canvas, pixels, index) {
  const size = state.model.image_size, plane = size * size, image = new ImageData(size, size), base = index * 3 * plane;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) image.data[4 * p + c] = toUint8(pixels[base + c * plane + p]);
    image.data[4 * p + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function canvases(container, n) {
  const size = state.model.image_size;
  while (container.children.length < n) {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    container.appendChild(canvas);
  }
  while (container.children.length > n) container.lastChild.remove();
  return Array.from(container.children);
}

async function drawGrid() {
  const started = performance.now();
  const pixels = await decodePixels(state.codes.map(steered));
  canvases($("grid"), state.codes.length).forEach((canvas, i) => paint(canvas, pixels, i));
  await drawStrip();
  const ms = performance.now() - started;
  $("timing").textContent = `${state.codes.length} faces decoded in ${ms.toFixed(0)} ms`;
  await drawEdit();
  return ms;
}

async function resample() {
  const seed = Math.max(0, Math.floor(Number($("seed").value) || 0));
  const temperature = Number($("temperature").value);
  const dist = state.colour ? state.hair[state.colour] : state.prior;
  state.codes = sampleCodes(dist, GRID, seed, temperature);
  state.codesColour = state.colour;
  if (state.a?.grid !== undefined || state.b?.grid !== undefined) state.a = state.b = null;  // those faces are gone
  markChosen();
  return drawGrid();
}

async function drawStrip() {
  if (state.a === null || state.b === null) {
    canvases($("strip"), 0);
    return;
  }
  const za = steered(state.a.code), zb = steered(state.b.code);
  const codes = Array.from({ length: STRIP }, (_, s) => za.map((v, i) => v + (zb[i] - v) * s / (STRIP - 1)));
  const pixels = await decodePixels(codes);
  canvases($("strip"), STRIP).forEach((canvas, i) => paint(canvas, pixels, i));
}

function markChosen() {
  Array.from($("grid").children).forEach((canvas, i) => {
    canvas.classList.toggle("a", state.a?.grid === i);
    canvas.classList.toggle("b", state.b?.grid === i);
  });
}

// face: { code (before the sliders), grid: its index in the grid, if it is a grid face }
function choose(face) {
  if (state.a === null || state.b !== null) [state.a, state.b] = [face, null];
  else state.b = face;
  markChosen();
  $("strip-note").textContent = state.b === null ? "Now click a second face for B." :
    "From A (orange) to B (blue), in " + STRIP + " steps of their codes.";
}

// ---------------------------------------------------------------- the face being edited, and its variations

function towards(colour) {  // the "towards <colour>" slider's direction, or null
  const slider = colour && state.model.sliders.find((s) => s.kind === "colour" && s.name === colour);
  return slider ? slider.direction : null;
}

// a code of the edited face as shown: moved from the hair colour it was drawn with to the chip's (as the explorer
// moves an uploaded face: along "towards <colour>" by 1), then by the sliders
function recoloured(code) {
  const z = Float32Array.from(code), to = towards(state.colour), from = towards(state.edit.colour);
  for (let i = 0; i < z.length; i++) z[i] += (to ? to[i] : 0) - (from ? from[i] : 0);
  return z;
}

function edit(code, label, colour = null) {
  state.edit = { code: Float32Array.from(code), label, colour };
  state.variations = variationsOf(state.edit.code);
  $("edit").hidden = false;
  redraw("edit");
}

// the mixture component most likely to have drawn z: its spread is where z's variations come from
function likeliestComponent(z) {
  const dist = state.prior, dim = dist.dim, y = new Float64Array(dim);
  let best = 0, bestScore = -Infinity;
  dist.factors.forEach((factor, k) => {
    let score = Math.log(dist.cumulative[k] - (k ? dist.cumulative[k - 1] : 0));
    for (let i = 0, row = 0; i < dim; row += ++i) {  // L y = z - mean, forward substitution
      let sum = z[i] - dist.means[k][i];
      for (let j = 0; j < i; j++) sum -= factor[row + j] * y[j];
      y[i] = sum / factor[row + i];
      score -= Math.log(factor[row + i]) + y[i] * y[i] / 2;
    }
    if (score > bestScore) [best, bestScore] = [k, score];
  });
  return best;
}

// VARIATIONS codes around `code` at a small temperature (the spread control): code + t L eps, L the Cholesky factor
// of its likeliest component (the Waifu Labs way of choosing: pick one, and draw around it again)
function variationsOf(code) {
  const factor = state.prior.factors[likeliestComponent(code)], dim = code.length, t = Number($("spread").value);
  const uniform = generator(++state.draws * 7919);
  return Array.from({ length: VARIATIONS }, () => {
    const eps = normals(uniform, dim), z = Float32Array.from(code);
    for (let i = 0, row = 0; i < dim; row += ++i) {
      let sum = 0;
      for (let j = 0; j <= i; j++) sum += factor[row + j] * eps[j];
      z[i] += t * sum;
    }
    return z;
  });
}

async function drawEdit() {
  if (!state.edit) return;
  const pixels = await decodePixels([state.edit.code, ...state.variations].map((z) => steered(recoloured(z))));
  paint($("edit-face"), pixels, 0);
  canvases($("variations"), VARIATIONS).forEach((canvas, i) => paint(canvas, pixels, i + 1));
  $("edit-label").textContent = state.edit.label + (state.colour && state.colour !== state.edit.colour ?
    `, towards ${state.colour} hair` : "");
}

function editedFace() {  // the edited face as A or B: its recoloured code (the strip adds the sliders)
  return { code: recoloured(state.edit.code) };
}

function saveGrid() {  // 8 faces a row, 2 px of padding, as torchvision's save_image lays out pipeline.sample's grid
  const size = state.model.image_size, pad = 2, nrow = 8, faces = Array.from($("grid").children);
  const rows = Math.ceil(faces.length / nrow), sheet = document.createElement("canvas");
  sheet.width = nrow * (size + pad) + pad;
  sheet.height = rows * (size + pad) + pad;
  faces.forEach((face, i) => sheet.getContext("2d").drawImage(face, pad + (i % nrow) * (size + pad),
                                                                pad + Math.floor(i / nrow) * (size + pad)));
  sheet.toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `faces-seed${$("seed").value}.png`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}

// ---------------------------------------------------------------- your picture: its faces, found and encoded here

class PictureProblem extends Error {}

// a picture's type and size from its first bytes (PNG, GIF, WebP, JPEG's first frame header), before it is decoded:
// one over the crop config's max_pixels (a decompression bomb) is refused without decoding it
function pictureSize(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const ascii = (start, n) => String.fromCharCode(...bytes.subarray(start, start + n));
  if (bytes.length >= 24 && ascii(0, 8) === "\x89PNG\r\n\x1a\n") {
    return { type: "PNG", width: view.getUint32(16), height: view.getUint32(20) };
  }
  if (bytes.length >= 10 && (ascii(0, 6) === "GIF87a" || ascii(0, 6) === "GIF89a")) {
    return { type: "GIF", width: view.getUint16(6, true), height: view.getUint16(8, true) };
  }
  if (bytes.length >= 30 && ascii(0, 4) === "RIFF" && ascii(8, 4) === "WEBP") {
    const chunk = ascii(12, 4);
    if (chunk === "VP8X" && bytes.length >= 30) {
      return { type: "WebP", width: 1 + (view.getUint32(24, true) & 0xffffff), height: 1 + (view.getUint32(26, true) >>> 8) };
    }
    if (chunk === "VP8L") {
      const bits = view.getUint32(21, true);
      return { type: "WebP", width: 1 + (bits & 0x3fff), height: 1 + ((bits >>> 14) & 0x3fff) };
    }
    if (chunk === "VP8 ") return { type: "WebP", width: view.getUint16(26, true) & 0x3fff, height: view.getUint16(28, true) & 0x3fff };
  }
  if (bytes.length >= 4 && bytes[0] === 0xff && bytes[1] === 0xd8) {  // JPEG: segments up to the first start of frame
    for (let at = 2; at + 9 < bytes.length;) {
      if (bytes[at] !== 0xff) return null;
      const marker = bytes[at + 1];
      if (marker === 0xff) { at += 1; continue; }
      if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
        return { type: "JPEG", height: view.getUint16(at + 5), width: view.getUint16(at + 7) };
      }
      at += marker >= 0xd0 && marker <= 0xd9 ? 2 : 2 + view.getUint16(at + 2);
    }
  }
  return null;
}

// RGBA exactly as decoded. A 2D canvas premultiplies alpha, which moves colours under partial transparency: fine
// for a JPEG (always opaque), and where WebGL is missing or the picture is larger than its textures; otherwise WebGL,
// which takes the picture without premultiplying its alpha or managing its colours
function decodedPixels(bitmap, opaque) {
  const { width, height } = bitmap, gl = !opaque && document.createElement("canvas").getContext("webgl2");
  if (gl && width <= gl.getParameter(gl.MAX_TEXTURE_SIZE) && height <= gl.getParameter(gl.MAX_TEXTURE_SIZE)) {
    const texture = gl.createTexture(), frame = gl.createFramebuffer(), out = new Uint8ClampedArray(width * height * 4);
    gl.bindTexture(gl.TEXTURE_2D, texture);
    gl.pixelStorei(gl.UNPACK_PREMULTIPLY_ALPHA_WEBGL, false);
    gl.pixelStorei(gl.UNPACK_COLORSPACE_CONVERSION_WEBGL, gl.NONE);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, width, height, 0, gl.RGBA, gl.UNSIGNED_BYTE, bitmap);
    gl.bindFramebuffer(gl.FRAMEBUFFER, frame);
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, texture, 0);
    gl.readPixels(0, 0, width, height, gl.RGBA, gl.UNSIGNED_BYTE, out);
    const read = gl.getError() === gl.NO_ERROR;
    gl.deleteFramebuffer(frame);
    gl.deleteTexture(texture);
    gl.getExtension("WEBGL_lose_context")?.loseContext();  // browsers keep only a few contexts alive
    if (read) return out;
  }
  const canvas = document.createElement("canvas");
  Object.assign(canvas, { width, height });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, width, height).data;
}

async function pictureOf(file) {  // -> { width, height, rgba }, the first frame of a GIF
  const size = pictureSize(new Uint8Array(await file.slice(0, 1 << 20).arrayBuffer()));
  if (!size) throw new PictureProblem(`${file.name} is not a picture this page can read: choose a JPEG, PNG, WebP or GIF`);
  const pixels = size.width * size.height, limit = state.model.upload.max_pixels;
  if (pixels > limit) {
    throw new PictureProblem(`${file.name} is ${size.width} x ${size.height} (${pixels.toLocaleString("en")} pixels), ` +
      `over this page's limit of ${limit.toLocaleString("en")} (the crop config's max_pixels): choose a smaller picture`);
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (err) {
    throw new PictureProblem(`${file.name} could not be decoded as a ${size.type} (${err.message}): the file may be ` +
                             "damaged; choose another picture");
  }
  try {
    return { width: bitmap.width, height: bitmap.height, rgba: decodedPixels(bitmap, size.type === "JPEG") };
  } finally {
    bitmap.close();
  }
}

// what the page loads on the first picture: OpenCV.js, the cascade and the encoder (not before: the first grid does
// not wait for them)
const detector = { loading: null };

async function moduleOf(name) {  // an ES module the export gzipped, run from memory
  const url = URL.createObjectURL(new Blob([await unpacked(name)], { type: "text/javascript" }));
  try {
    return await import(url);
  } catch (err) {
    throw new FileProblem(`${name} is damaged (${err.message}): export the model again`);
  } finally {
    URL.revokeObjectURL(url);
  }
}

function loadDetector() {
  if (!detector.loading) {
    detector.loading = (async () => {
      const upload = state.model.upload;
      const [opencv, cascade, encoder] = await Promise.all([
        moduleOf(upload.opencv), fetchFile(upload.cascade, "bytes"), fetchFile(upload.encoder, "bytes")]);
      let cv;
      try {
        cv = await opencv.default();
      } catch (err) {
        throw new FileProblem(`${upload.opencv} could not be started (${err.message || err}): export the model again`);
      }
      cv.FS_createDataFile("/", "cascade.xml", new Uint8Array(cascade), true, false, false);
      const classifier = new cv.CascadeClassifier();
      let loaded = false;
      try {
        loaded = classifier.load("cascade.xml") && !classifier.empty();
      } catch (err) { /* OpenCV throws on some malformed XML instead of returning false */ }
      if (!loaded) throw new FileProblem(`${upload.cascade} is damaged (not an OpenCV cascade): export the model again`);
      let session;
      try {
        session = await ort.InferenceSession.create(encoder, { executionProviders: ["wasm"] });
      } catch (err) {
        throw new FileProblem(`${upload.encoder} could not be started (${err.message}): the file is damaged; export ` +
                              "the model again");
      }
      return { cv, classifier, session };
    })();
    detector.loading.catch(() => { detector.loading = null; });  // the next picture tries again
  }
  return detector.loading;
}

function roundHalfEven(x) {  // Python's round() and numpy's: halves to the even neighbour
  const floor = Math.floor(x), rest = x - floor;
  return rest > 0.5 || (rest === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
}

// pipeline/faces.py: square_crop_box, in the same double arithmetic
function squareCropBox([x, y, w, h], margin, width, height) {
  const side = Math.min(roundHalfEven(Math.max(w, h) * (1 + 2 * margin)), width, height);
  const cx = x + w / 2, cy = y + h / 2;
  return [roundHalfEven(Math.min(Math.max(cx - side / 2, 0), width - side)),
          roundHalfEven(Math.min(Math.max(cy - side / 2, 0), height - side)), side];
}

// pipeline/images.py: on_white, in numpy's float32 arithmetic (alpha 255 leaves a pixel as it is)
function onWhite(rgba) {
  let opaque = true;
  for (let p = 3; p < rgba.length && opaque; p += 4) opaque = rgba[p] === 255;
  if (opaque) return rgba;
  const out = new Uint8ClampedArray(rgba.length), f = Math.fround;
  for (let p = 0; p < rgba.length; p += 4) {
    const a = f(rgba[p + 3] / 255), white = f(255 * f(1 - a));
    for (let c = 0; c < 3; c++) out[p + c] = roundHalfEven(f(f(rgba[p + c] * a) + white));
    out[p + 3] = 255;
  }
  return out;
}

// pipeline/faces.py: face_tiles. Boxes on the stored colours (grey, equalizeHist, detectMultiScale with the crop
// config's settings), tiles cut from the picture over white: a square around each box, area-resized
function facesIn({ cv, classifier }, picture) {
  const settings = state.model.upload, size = state.model.image_size;
  const stored = cv.matFromImageData(new ImageData(picture.rgba, picture.width, picture.height));
  const white = cv.matFromImageData(new ImageData(onWhite(picture.rgba), picture.width, picture.height));
  const grey = new cv.Mat(), rgb = new cv.Mat(), found = new cv.RectVector(), neighbours = new cv.IntVector();
  try {
    cv.cvtColor(stored, grey, cv.COLOR_RGBA2GRAY);
    cv.equalizeHist(grey, grey);
    classifier.detectMultiScale2(grey, found, neighbours, settings.scale_factor, settings.min_neighbors, 0,
                                 new cv.Size(settings.min_size, settings.min_size), new cv.Size(0, 0));
    cv.cvtColor(white, rgb, cv.COLOR_RGBA2RGB);
    const faces = [];
    for (let i = 0; i < found.size(); i++) {
      const r = found.get(i), box = [r.x, r.y, r.width, r.height];
      const [left, top, side] = squareCropBox(box, settings.margin, picture.width, picture.height);
      const square = rgb.roi(new cv.Rect(left, top, side, side)), tile = new cv.Mat();
      cv.resize(square, tile, new cv.Size(size, size), 0, 0, cv.INTER_AREA);
      faces.push({ box, tile: Uint8Array.from(tile.data) });
      square.delete();
      tile.delete();
    }
    return faces;
  } finally {
    [stored, white, grey, rgb, found, neighbours].forEach((m) => m.delete());
  }
}

function encodeTiles(session, tiles) {  // uint8 H x W x 3 tiles -> codes (encoder means), as pipeline.load().encode
  const size = state.model.image_size, plane = size * size, input = new Float32Array(tiles.length * 3 * plane);
  tiles.forEach((tile, n) => {
    for (let p = 0; p < plane; p++) for (let c = 0; c < 3; c++) input[(n * 3 + c) * plane + p] = tile[3 * p + c] / 255;
  });
  return inTurn(async () => {
    const z = (await session.run({ pixels: new ort.Tensor("float32", input, [tiles.length, 3, size, size]) })).z.data;
    const dim = state.model.latent_dim;
    return tiles.map((_, n) => z.slice(n * dim, (n + 1) * dim));
  });
}

function paintTile(canvas, tile) {
  const size = state.model.image_size, image = new ImageData(size, size);
  for (let p = 0; p < size * size; p++) {
    image.data.set(tile.subarray(3 * p, 3 * p + 3), 4 * p);
    image.data[4 * p + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function showUploads(name, faces, codes, pixels) {
  const size = state.model.image_size;
  $("uploads").replaceChildren(...faces.map((face, i) => {
    const figure = document.createElement("figure"), caption = document.createElement("figcaption");
    const [crop, reconstruction] = [0, 1].map(() => Object.assign(document.createElement("canvas"), { width: size, height: size }));
    crop.className = "crop";
    reconstruction.className = "reconstruction";
    paintTile(crop, face.tile);
    paint(reconstruction, pixels, i);
    figure.dataset.box = face.box.join(",");
    caption.textContent = `face ${i + 1}`;
    figure.title = "the face found, and its reconstruction: click to edit it (and pick it for A -> B)";
    figure.append(crop, reconstruction, caption);
    figure.onclick = () => {
      edit(codes[i], `${name}, face ${i + 1}`);
      choose(editedFace());
      redraw("strip");
    };
    return figure;
  }));
}

// a new picture replaces the faces of the last one; one picture at a time
let uploading = Promise.resolve();
function uploadPicture(file) {
  uploading = uploading.then(() => readPicture(file));
  return uploading;
}

async function readPicture(file) {
  const box = $("uploads"), started = performance.now();
  box.replaceChildren();
  box.dataset.state = "working";
  say("");
  $("upload-note").textContent = `Looking for faces in ${file.name}...`;
  try {
    if (!state.model.upload) {
      throw new PictureProblem("This export carries no face detector (it was exported with cascade=false): export " +
                               "it again with cascade=true to take pictures");
    }
    const [picture, found] = await Promise.all([pictureOf(file), loadDetector()]);
    const loaded = performance.now(), faces = facesIn(found, picture), detected = performance.now();
    if (!faces.length) {
      throw new PictureProblem(`No face found in ${file.name}: the detector (lbpcascade_animeface) finds anime faces ` +
        `at least ${state.model.upload.min_size} px across, looking at the viewer; try a larger or clearer picture`);
    }
    const codes = await encodeTiles(found.session, faces.map((face) => face.tile));
    showUploads(file.name, faces, codes, await decodePixels(codes));
    state.uploads = faces.map((face, i) => ({ box: face.box, code: Array.from(codes[i]) }));
    window.timings.upload = { total: performance.now() - started, decoded: loaded - started, detected: detected - loaded,
                              encoded: performance.now() - detected };
    $("upload-note").textContent = `${faces.length} face(s) in ${file.name} (${picture.width} x ${picture.height}), ` +
      `found and encoded in ${(performance.now() - started).toFixed(0)} ms: click one to edit it.`;
    box.dataset.state = "done";
  } catch (err) {
    state.uploads = [];
    $("upload-note").textContent = "";
    say(err instanceof FileProblem || err instanceof PictureProblem ? err.message
        : `${file.name} could not be read: ${err.message}`);
    box.dataset.state = "error";
  }
}

// ---------------------------------------------------------------- controls

function buildControls() {
  const chips = $("hair");
  const colours = [null, ...Object.keys(state.hair)];
  for (const colour of colours) {
    const chip = document.createElement("button");
    chip.textContent = colour || "any";
    chip.title = colour ? `${state.model.hair[colour].faces} training faces of this colour` : "the stored mixture";
    chip.className = colour === state.colour ? "on" : "";
    chip.onclick = () => {
      state.colour = colour;
      Array.from(chips.children).forEach((c, i) => c.classList.toggle("on", colours[i] === colour));
      redraw("codes");
    };
    chips.appendChild(chip);
  }
  if (colours.length === 1) chips.textContent = "This run offers no hair colours.";
  for (const slider of state.model.sliders) {
    const row = document.createElement("div"), label = document.createElement("label");
    const input = document.createElement("input"), value = document.createElement("span");
    row.className = "slider";
    label.textContent = slider.kind === "colour" ? `towards ${slider.name}` : slider.name;
    Object.assign(input, { type: "range", min: -3, max: 3, step: 0.1, value: 0 });
    value.textContent = "0.0";
    input.oninput = () => {
      state.values[slider.name] = Number(input.value);
      value.textContent = Number(input.value).toFixed(1);
      redraw("grid");
    };
    row.append(label, input, value);
    $("sliders").appendChild(row);
  }
  if (!state.model.sliders.length) $("sliders").textContent = "This run has no named sliders.";
  $("resample").onclick = () => { $("seed").value = Number($("seed").value) + 1; redraw("codes"); };
  $("seed").onchange = () => redraw("codes");
  $("temperature").oninput = () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
    redraw("codes");
  };
  $("grid").onclick = (event) => {
    const index = Array.from($("grid").children).indexOf(event.target);
    if (index >= 0) {
      choose({ code: state.codes[index], grid: index });
      edit(state.codes[index], `grid face ${index + 1}`, state.codesColour);
      redraw("strip");
    }
  };
  $("variations").onclick = (event) => {
    const index = Array.from($("variations").children).indexOf(event.target);
    if (index >= 0) {
      const { label, colour } = state.edit;
      edit(state.variations[index], `variation ${index + 1} of ${label.replace(/^variation \d+ of /, "")}`, colour);
      choose(editedFace());
      redraw("strip");
    }
  };
  $("edit-face").onclick = () => {
    choose(editedFace());
    redraw("strip");
  };
  $("spread").oninput = () => {
    $("spread-value").textContent = Number($("spread").value).toFixed(2);
    if (state.edit) {
      state.variations = variationsOf(state.edit.code);
      redraw("edit");
    }
  };
  $("picture").onchange = () => {
    if ($("picture").files[0]) uploadPicture($("picture").files[0]);
    $("picture").value = "";  // the same file chosen again is a new upload
  };
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files[0]) uploadPicture(event.dataTransfer.files[0]);
  });
  $("save").onclick = saveGrid;
}

// What is out of date, most first: new codes (which redraw the grid, the strip and the edited face), the grid (the
// strip and the edited face too), the strip, the edited face. Controls only mark it; one decode runs at a time, and
// a slider dragged past ten values costs one redraw, not ten.
const stale = { codes: false, grid: false, strip: false, edit: false };
const JOBS = [["codes", () => resample(), ["codes", "grid", "strip", "edit"]], ["grid", () => drawGrid(), ["grid", "strip", "edit"]],
              ["strip", () => drawStrip(), ["strip"]], ["edit", () => drawEdit(), ["edit"]]];
let drawing = false;

async function redraw(what) {
  stale[what] = true;
  if (drawing) return;
  drawing = true;
  try {
    while (Object.values(stale).some(Boolean)) {
      const [, job, covers] = JOBS.find(([name]) => stale[name]);
      covers.forEach((name) => { stale[name] = false; });
      await job();
    }
  } catch (err) {
    say(err instanceof FileProblem ? err.message : `The decoder failed: ${err.message}`);
  } finally {
    drawing = false;
  }
}

// ---------------------------------------------------------------- start

async function start() {
  if (typeof ort === "undefined") {
    throw new FileProblem("ort/ort.wasm.min.js could not be loaded: the folder is incomplete; publish the whole web " +
                          "folder that `python -m pipeline.export` wrote");
  }
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  // threads need a cross-origin-isolated page (COOP/COEP headers); plain static hosts get one thread
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const [model, priorBuffer, decoder, wasm] = await Promise.all([
    fetchFile("model.json", "json"), fetchFile("prior.bin", "bytes"), fetchFile("decoder.onnx", "bytes"),
    unpacked("ort/ort-wasm-simd-threaded.wasm.gz")]);  // gzipped by the export: 3.8 MB to fetch, not 14.8
  ort.env.wasm.wasmBinary = wasm;
  if (model.format !== "animeface-vae-web/2") {
    throw new FileProblem(`model.json is not an animeface-vae web model (format ${model.format}): export the model again`);
  }
  state.model = model;
  state.prior = mixture(priorBuffer, model.prior, model.latent_dim, "prior");
  for (const [colour, own] of Object.entries(model.hair)) {
    state.hair[colour] = mixture(priorBuffer, own, model.latent_dim, `hair ${colour}`);
  }
  try {
    state.session = await ort.InferenceSession.create(decoder, { executionProviders: ["wasm"] });
  } catch (err) {
    throw new FileProblem(`decoder.onnx could not be started (${err.message}): the file is damaged; export the model again`);
  }
  $("about").textContent = `obs_std=${model.obs_std}, step ${model.step}, ${model.decoder} decoder (${model.precision} ` +
    `weights), ${model.prior.weights.length}-component mixture over ${model.latent_dim}-dimensional codes; ` +
    `WebAssembly, ${ort.env.wasm.numThreads} thread(s)`;
  if (!model.upload) {
    $("upload-note").textContent = "This export carries no face detector (it was exported with cascade=false): " +
      "uploads are off.";
    $("picture").disabled = true;
  }
  buildControls();
  window.timings = { firstGrid: await resample() };
  document.body.dataset.ready = "1";
}

// for tests and scripts: pixels (uint8, H x W x 3 per face) of codes given as arrays of numbers
window.decodeCodes = async (codes) => {
  const pixels = await decodePixels(codes.map((z) => Float32Array.from(z)));
  const size = state.model.image_size, plane = size * size;
  return codes.map((_, n) => {
    const out = new Array(plane * 3);
    for (let p = 0; p < plane; p++) for (let c = 0; c < 3; c++) out[3 * p + c] = toUint8(pixels[(n * 3 + c) * plane + p]);
    return out;
  });
};
// n codes as the grid draws them (colour: a hair colour the run offers, or null for the stored mixture)
window.sampledCodes = (n, seed, temperature, colour) =>
  sampleCodes(colour ? state.hair[colour] : state.prior, n, seed, temperature).map((z) => Array.from(z));
window.drawGrid = drawGrid;  // -> milliseconds
// the faces of the last picture: their boxes and codes
window.uploadedFaces = () => state.uploads;

if (!window.pageStopped) {
  start().catch((err) => {
    say(err instanceof FileProblem ? err.message : `The page could not start: ${err.message}`);
    document.body.dataset.ready = "error";
  });
}
