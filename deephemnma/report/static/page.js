/* deephemnma results page: decoding of the embedded data and start-up.
 *
 * Binary arrays are embedded as <script type="application/octet-stream"> elements holding
 * base64 text (optionally of gzip data, decoded with the browser's DecompressionStream);
 * nothing is fetched. window.dhPage exposes the state for scripts and tests:
 * dhPage.ready (landscape interactive), dhPage.landscape, dhPage.views3d, dhPage.timings.
 */
"use strict";

(function () {
  const TYPES = { float32: Float32Array, float64: Float64Array, uint8: Uint8Array, int8: Int8Array,
    uint16: Uint16Array, int16: Int16Array, uint32: Uint32Array, int32: Int32Array };
  const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const LUT = new Uint8Array(128);
  for (let i = 0; i < ALPHABET.length; i++) LUT[ALPHABET.charCodeAt(i)] = i;

  const page = window.dhPage = { ready: false, errors: [], timings: { start: performance.now() } };

  function b64decode(s) {
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(s);
    const len = s.length, pad = s.endsWith("==") ? 2 : s.endsWith("=") ? 1 : 0;
    const out = new Uint8Array((len * 3) / 4 - pad);
    let o = 0;
    for (let i = 0; i < len; i += 4) {
      const n = (LUT[s.charCodeAt(i)] << 18) | (LUT[s.charCodeAt(i + 1)] << 12) | (LUT[s.charCodeAt(i + 2)] << 6) | LUT[s.charCodeAt(i + 3)];
      out[o++] = n >> 16;
      if (o < out.length) out[o++] = (n >> 8) & 255;
      if (o < out.length) out[o++] = n & 255;
    }
    return out;
  }

  async function gunzip(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  /** The bytes of an embedded blob (element id), decompressed. */
  async function blobBytes(id) {
    const el = document.getElementById(id);
    if (!el) throw new Error(`embedded data ${id} missing`);
    let bytes = b64decode(el.textContent.trim());
    if (el.dataset.enc === "gzip") bytes = await gunzip(bytes);
    return bytes;
  }

  /** An embedded typed array. */
  async function typedArray(id) {
    const el = document.getElementById(id), bytes = await blobBytes(id);
    const T = TYPES[el.dataset.dtype];
    return new T(bytes.buffer, bytes.byteOffset, bytes.byteLength / T.BYTES_PER_ELEMENT);
  }

  function jsonData(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  async function startLandscape() {
    const root = document.getElementById("dh-landscape");
    const meta = jsonData("dh-landscape-meta");
    if (!root || !meta) return;
    const arrays = {};
    await Promise.all(meta.arrays.map(async a => { arrays[a.name] = await typedArray(a.id); }));
    page.timings.decoded = performance.now();
    page.landscape = new window.DHLandscape(root, { meta, arrays });
    page.timings.firstRender = performance.now();
  }

  function start3d() {
    const views = jsonData("dh-3d-meta");
    if (!views || !window.DHViews3D) return;
    page.views3d = new window.DHViews3D(views, blobBytes);
  }

  window.addEventListener("error", e => page.errors.push(String(e.message)));
  window.addEventListener("unhandledrejection", e => page.errors.push(String(e.reason)));
  document.addEventListener("DOMContentLoaded", async () => {
    page.timings.dom = performance.now();
    try {
      await startLandscape();
    } catch (err) {
      console.error("landscape:", err);
      const el = document.getElementById("dh-landscape");
      if (el) el.insertAdjacentHTML("afterbegin", `<p class="bad">The landscape could not be shown: ${err}</p>`);
    }
    page.ready = true;
    page.timings.ready = performance.now();
    try { start3d(); } catch (err) { console.error("3D views:", err); }
  });
  page.blobBytes = blobBytes;
})();
