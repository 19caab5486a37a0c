// The web page of an export (pipeline/web.py writes its folder): codes drawn in this browser from the run's stored
// mixture, decoded by the run's default decoder in ONNX Runtime Web. Same distribution as `python -m pipeline.sample`,
// with this page's own random numbers (a browser cannot replay torch's generator).
"use strict";

const $ = (id) => document.getElementById(id);
const GRID = 64, STRIP = 10;
const state = { model: null, session: null, prior: null, hair: {}, colour: null, codes: [], values: {}, a: null, b: null };

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

async function decodePixels(codes) {  // -> Float32Array n x 3 x H x W of pixel means in [0, 1]
  const dim = state.model.latent_dim, flat = new Float32Array(codes.length * dim);
  codes.forEach((z, i) => flat.set(z, i * dim));
  const output = await state.session.run({ z: new ort.Tensor("float32", flat, [codes.length, dim]) });
  return output.pixels.data;
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
  return ms;
}

async function resample() {
  const seed = Math.max(0, Math.floor(Number($("seed").value) || 0));
  const temperature = Number($("temperature").value);
  const dist = state.colour ? state.hair[state.colour] : state.prior;
  state.codes = sampleCodes(dist, GRID, seed, temperature);
  state.a = state.b = null;
  markChosen();
  return drawGrid();
}

async function drawStrip() {
  if (state.a === null || state.b === null) {
    canvases($("strip"), 0);
    return;
  }
  const za = steered(state.codes[state.a]), zb = steered(state.codes[state.b]);
  const codes = Array.from({ length: STRIP }, (_, s) => za.map((v, i) => v + (zb[i] - v) * s / (STRIP - 1)));
  const pixels = await decodePixels(codes);
  canvases($("strip"), STRIP).forEach((canvas, i) => paint(canvas, pixels, i));
}

function markChosen() {
  Array.from($("grid").children).forEach((canvas, i) => {
    canvas.classList.toggle("a", i === state.a);
    canvas.classList.toggle("b", i === state.b);
  });
}

function choose(index) {
  if (state.a === null || state.b !== null) [state.a, state.b] = [index, null];
  else state.b = index;
  markChosen();
  $("strip-note").textContent = state.b === null ? "Now click a second face for B." :
    "From A (orange) to B (blue), in " + STRIP + " steps of their codes.";
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
      choose(index);
      redraw("strip");
    }
  };
  $("save").onclick = saveGrid;
}

// What is out of date, most first: new codes (which redraw the grid and the strip), the grid, the strip. Controls
// only mark it; one decode runs at a time, and a slider dragged past ten values costs one redraw, not ten.
const stale = { codes: false, grid: false, strip: false };
let drawing = false;

async function redraw(what) {
  stale[what] = true;
  if (drawing) return;
  drawing = true;
  try {
    while (stale.codes || stale.grid || stale.strip) {
      const job = stale.codes ? resample : stale.grid ? drawGrid : drawStrip;
      stale.codes = stale.grid = stale.strip = false;
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
  const [model, priorBuffer, decoder] = await Promise.all([
    fetchFile("model.json", "json"), fetchFile("prior.bin", "bytes"), fetchFile("decoder.onnx", "bytes"),
    fetchFile("ort/ort-wasm-simd-threaded.wasm", "head")]);  // ONNX Runtime fetches it itself; named if missing
  if (model.format !== "animeface-vae-web/1") {
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

if (!window.pageStopped) {
  start().catch((err) => {
    say(err instanceof FileProblem ? err.message : `The page could not start: ${err.message}`);
    document.body.dataset.ready = "error";
  });
}
