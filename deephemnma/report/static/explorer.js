/* deephemnma results page: the interactive landscape.
 *
 * Every particle is drawn by a small software rasteriser into an ImageData (an exact density:
 * each particle adds its colour to the pixel(s) it falls on), so 10^6 particles redraw in tens
 * of milliseconds without WebGL. Selections (boxes, lassos) are decided on the full Float32
 * coordinate arrays with the same arithmetic as `deephemnma select` (deephemnma/core/selection.py),
 * so a saved selection picks exactly the particles counted here.
 */
"use strict";

(function () {
  const MARGIN = { left: 58, right: 12, top: 10, bottom: 40 };
  const GREY = [190, 190, 190];
  const MAX_SAVED_INDICES = 20000;

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4).replace(/\.?0+$/, "");
  }

  function niceTicks(lo, hi, count) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const step0 = span / count, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const err = step0 / mag;
    const step = mag * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }

  /** Point in polygon, even-odd rule: the expression of deephemnma.core.selection.shape_mask. */
  function insideLasso(pts, bbox, px, py) {
    if (!(px >= bbox[0] && px <= bbox[1] && py >= bbox[2] && py <= bbox[3])) return false;
    let inside = false;
    for (let i = 0, j = pts.length - 1; i < pts.length; j = i++) {
      const xi = pts[i][0], yi = pts[i][1], xj = pts[j][0], yj = pts[j][1];
      if ((yi > py) !== (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi) inside = !inside;
    }
    return inside;
  }

  function lassoBBox(pts) {
    const b = [Infinity, -Infinity, Infinity, -Infinity];
    for (const [x, y] of pts) { b[0] = Math.min(b[0], x); b[1] = Math.max(b[1], x); b[2] = Math.min(b[2], y); b[3] = Math.max(b[3], y); }
    return b;
  }

  class Landscape {
    /** root: the element holding the explorer's markup; data: {meta, arrays} from page.js. */
    constructor(root, data) {
      this.root = root;
      this.meta = data.meta;
      this.arrays = data.arrays;
      this.n = this.meta.n;
      this.coords = this.meta.columns.filter(c => c.kind === "coord");
      this.shapes = [];
      this.selMask = null;
      this.count = 0;
      this.mode = "box";
      this.drag = null;
      this.hover = -1;
      this.canvas = root.querySelector("canvas.dh-raster");
      this.overlay = root.querySelector("canvas.dh-overlay");
      this.ctx = this.canvas.getContext("2d");
      this.octx = this.overlay.getContext("2d");
      this.tip = root.querySelector(".dh-tip");
      this.setAxes(this.coords[0].name, (this.coords[1] || this.coords[0]).name);
      this.setColour(this.meta.default_colour);
      this.bindControls();
      this.bindPointer();
      new ResizeObserver(() => this.resize()).observe(this.canvas.parentElement);
      this.resize();
    }

    column(name) { return this.meta.columns.find(c => c.name === name); }

    /** Values of column `name` for particle i (dequantised numeric columns). */
    value(name, i) {
      const c = this.column(name), a = this.arrays[name];
      if (!c || !a) return null;
      if (c.kind === "numeric" && c.quantised) return a[i] === 65535 ? NaN : c.min + a[i] * c.step;
      return a[i];
    }

    setAxes(xname, yname) {
      this.xname = xname; this.yname = yname;
      this.x = this.arrays[xname]; this.y = this.arrays[yname];
      const cx = this.column(xname), cy = this.column(yname);
      const px = (cx.max - cx.min) * 0.04 || 1, py = (cy.max - cy.min) * 0.04 || 1;
      this.home = { x0: cx.min - px, x1: cx.max + px, y0: cy.min - py, y1: cy.max + py };
      this.view = Object.assign({}, this.home);
      this.clearSelection(false);
    }

    /** Per-particle palette index and the palette for the colour-by choice. */
    setColour(name) {
      this.colourBy = name;
      const n = this.n, idx = new Uint16Array(n), c = this.column(name);  // 256: grey (unknown, missing)
      if (!c) { this.palette = [[40, 60, 120]]; this.colIdx = idx; this.legendKind = "density"; return; }
      const a = this.arrays[name];
      if (c.kind === "category") {
        const lut = new Map(c.levels.map((lv, k) => [lv.value, k]));
        for (let i = 0; i < n; i++) { const k = lut.get(a[i]); idx[i] = k === undefined || k > 255 ? 256 : k; }
        this.palette = c.levels.map(lv => lv.rgb);
        this.legendKind = "category";
      } else {
        const lo = c.lo, hi = c.hi, ramp = this.meta.ramp;
        const q = c.quantised, step = c.step || 1, base = c.min;
        const scale = 255 / (hi - lo || 1);
        for (let i = 0; i < n; i++) {
          const raw = a[i];
          const v = q ? (raw === 65535 ? NaN : base + raw * step) : raw;
          let k = Math.floor((v - lo) * scale);
          idx[i] = Number.isNaN(k) ? 256 : k < 0 ? 0 : k > 255 ? 255 : k;
        }
        this.palette = ramp;
        this.legendKind = "numeric";
      }
      this.colIdx = idx;
    }

    resize() {
      const box = this.canvas.parentElement.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(200, Math.floor(box.width)), h = Math.max(200, Math.floor(box.height));
      for (const cv of [this.canvas, this.overlay]) {
        cv.width = Math.floor(w * dpr); cv.height = Math.floor(h * dpr);
        cv.style.width = w + "px"; cv.style.height = h + "px";
      }
      this.cssW = w; this.cssH = h; this.dpr = dpr;
      this.plot = { x: MARGIN.left, y: MARGIN.top, w: w - MARGIN.left - MARGIN.right, h: h - MARGIN.top - MARGIN.bottom };
      const W = Math.max(1, Math.floor(this.plot.w * dpr)), H = Math.max(1, Math.floor(this.plot.h * dpr));
      this.W = W; this.H = H;
      this.acc = { cnt: new Float32Array(W * H), sel: new Float32Array(W * H), r: new Float32Array(W * H),
                   g: new Float32Array(W * H), b: new Float32Array(W * H), top: new Int32Array(W * H) };
      this.image = this.ctx.createImageData(W, H);
      this.render();
    }

    /** Splat offsets (pixels) of one particle: bigger dots when there are few particles. */
    splat() {
      const r = this.n < 3000 ? 3 : this.n < 30000 ? 2 : this.n < 300000 ? 1 : 0;
      const off = [];
      for (let dy = -r; dy <= r; dy++) for (let dx = -r; dx <= r; dx++) if (dx * dx + dy * dy <= r * r + r) off.push([dx, dy]);
      return off;
    }

    /** Palette as flat channels; entry 256 is the grey of unselected particles and of density. */
    flatPalette() {
      const R = new Float32Array(257), G = new Float32Array(257), B = new Float32Array(257);
      R.fill(GREY[0]); G.fill(GREY[1]); B.fill(GREY[2]);
      this.palette.forEach((c, k) => { if (k < 256) { R[k] = c[0]; G[k] = c[1]; B[k] = c[2]; } });
      return [R, G, B];
    }

    /** Accumulate every particle in view into the per-pixel buffers. */
    rasterise() {
      const { cnt, sel, r, g, b, top } = this.acc, W = this.W, H = this.H, v = this.view;
      cnt.fill(0); sel.fill(0); r.fill(0); g.fill(0); b.fill(0); top.fill(-1);
      const sx = W / (v.x1 - v.x0), sy = H / (v.y1 - v.y0), X = this.x, Y = this.y;
      const [PR, PG, PB] = this.flatPalette(), ci = this.colIdx, mask = this.selMask, off = this.splat();
      const density = this.legendKind === "density", single = off.length === 1, n = this.n;
      for (let i = 0; i < n; i++) {
        const px = Math.floor((X[i] - v.x0) * sx), py = Math.floor((v.y1 - Y[i]) * sy);
        if (!(px >= -3 && px < W + 3 && py >= -3 && py < H + 3)) continue;
        const on = mask === null || mask[i] === 1, c = on && !density ? ci[i] : 256;
        if (single) {
          if (px >= W || py >= H || px < 0 || py < 0) continue;
          const k = py * W + px;
          cnt[k] += 1; r[k] += PR[c]; g[k] += PG[c]; b[k] += PB[c]; top[k] = i;
          if (on) sel[k] += 1;
          continue;
        }
        for (let o = 0; o < off.length; o++) {
          const qx = px + off[o][0], qy = py + off[o][1];
          if (qx < 0 || qx >= W || qy < 0 || qy >= H) continue;
          const k = qy * W + qx;
          cnt[k] += 1; r[k] += PR[c]; g[k] += PG[c]; b[k] += PB[c]; top[k] = i;
          if (on) sel[k] += 1;
        }
      }
    }

    /** Turn the buffers into pixels: mean colour per pixel, opacity from log density. */
    compose() {
      const { cnt, sel, r, g, b } = this.acc, d = this.image.data, N = this.W * this.H;
      let maxc = 1;
      for (let k = 0; k < N; k++) if (cnt[k] > maxc) maxc = cnt[k];
      const lnorm = 1 / Math.log1p(maxc), density = this.legendKind === "density";
      const ramp = this.meta.ramp, masked = this.selMask !== null;
      for (let k = 0, p = 0; k < N; k++, p += 4) {
        const c = cnt[k];
        if (c === 0) { d[p] = 255; d[p + 1] = 255; d[p + 2] = 255; d[p + 3] = 255; continue; }
        const t = Math.log1p(c) * lnorm;
        let cr, cg, cb;
        if (density && !(masked && sel[k] === 0)) { const rc = ramp[Math.min(255, Math.floor(t * 255))]; cr = rc[0]; cg = rc[1]; cb = rc[2]; }
        else { cr = r[k] / c; cg = g[k] / c; cb = b[k] / c; }
        const a = density ? 1 : Math.min(1, 0.45 + 0.55 * t);
        d[p] = 255 + (cr - 255) * a; d[p + 1] = 255 + (cg - 255) * a; d[p + 2] = 255 + (cb - 255) * a; d[p + 3] = 255;
      }
    }

    render() {
      const t0 = performance.now();
      this.rasterise();
      this.compose();
      this.ctx.setTransform(1, 0, 0, 1, 0, 0);
      this.ctx.fillStyle = "#fff";
      this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
      this.ctx.putImageData(this.image, Math.round(this.plot.x * this.dpr), Math.round(this.plot.y * this.dpr));
      this.lastRenderMs = performance.now() - t0;
      this.drawOverlay();
      this.drawLegend();
      this.root.dataset.rendered = String((+this.root.dataset.rendered || 0) + 1);
    }

    toScreen(x, y) {
      const v = this.view, p = this.plot;
      return [p.x + (x - v.x0) / (v.x1 - v.x0) * p.w, p.y + (v.y1 - y) / (v.y1 - v.y0) * p.h];
    }

    toData(sx, sy) {
      const v = this.view, p = this.plot;
      return [v.x0 + (sx - p.x) / p.w * (v.x1 - v.x0), v.y1 - (sy - p.y) / p.h * (v.y1 - v.y0)];
    }

    drawAxes(o) {
      const p = this.plot, v = this.view;
      o.strokeStyle = "#889"; o.lineWidth = 1; o.strokeRect(p.x + 0.5, p.y + 0.5, p.w, p.h);
      o.fillStyle = "#334"; o.font = "11px sans-serif"; o.textAlign = "center"; o.textBaseline = "top";
      for (const t of niceTicks(v.x0, v.x1, Math.max(2, Math.floor(p.w / 90)))) {
        const [sx] = this.toScreen(t, v.y0);
        o.beginPath(); o.moveTo(sx, p.y + p.h); o.lineTo(sx, p.y + p.h + 4); o.stroke();
        o.fillText(fmt(t), sx, p.y + p.h + 6);
      }
      o.textAlign = "right"; o.textBaseline = "middle";
      for (const t of niceTicks(v.y0, v.y1, Math.max(2, Math.floor(p.h / 60)))) {
        const [, sy] = this.toScreen(v.x0, t);
        o.beginPath(); o.moveTo(p.x - 4, sy); o.lineTo(p.x, sy); o.stroke();
        o.fillText(fmt(t), p.x - 6, sy);
      }
      o.textAlign = "center"; o.textBaseline = "bottom"; o.font = "12px sans-serif";
      o.fillText(this.column(this.xname).label, p.x + p.w / 2, this.cssH - 2);
      o.save(); o.translate(12, p.y + p.h / 2); o.rotate(-Math.PI / 2); o.textBaseline = "middle";
      o.fillText(this.column(this.yname).label, 0, 0); o.restore();
    }

    tracePath(o, s) {
      o.beginPath();
      if (s.type === "box") {
        const [ax, ay] = this.toScreen(s.x[0], s.y[1]), [bx, by] = this.toScreen(s.x[1], s.y[0]);
        o.rect(ax, ay, bx - ax, by - ay);
      } else {
        s.points.forEach(([x, y], k) => { const [sx, sy] = this.toScreen(x, y); k ? o.lineTo(sx, sy) : o.moveTo(sx, sy); });
        o.closePath();
      }
    }

    drawOverlay() {
      const o = this.octx, p = this.plot;
      o.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      o.clearRect(0, 0, this.cssW, this.cssH);
      this.drawAxes(o);
      o.save(); o.beginPath(); o.rect(p.x, p.y, p.w, p.h); o.clip();
      for (const s of this.shapes) { this.tracePath(o, s); o.strokeStyle = "#d35400"; o.lineWidth = 1.5; o.stroke(); }
      if (this.drag && this.drag.shape) { this.tracePath(o, this.drag.shape); o.setLineDash([4, 3]); o.strokeStyle = "#d35400"; o.stroke(); o.setLineDash([]); }
      if (this.hover >= 0) {
        const [sx, sy] = this.toScreen(this.x[this.hover], this.y[this.hover]);
        o.beginPath(); o.arc(sx, sy, 6, 0, 2 * Math.PI); o.strokeStyle = "#000"; o.lineWidth = 1.5; o.stroke();
      }
      o.restore();
    }

    /** Counts of each category level, over all particles and over the selection. */
    levelCounts(c) {
      const a = this.arrays[c.name], lut = new Map(c.levels.map((lv, k) => [lv.value, k]));
      const all = new Float64Array(c.levels.length), sel = new Float64Array(c.levels.length), m = this.selMask;
      for (let i = 0; i < this.n; i++) { const k = lut.get(a[i]); if (k !== undefined) { all[k]++; if (m && m[i]) sel[k]++; } }
      return [all, sel];
    }

    drawLegend() {
      const el = this.root.querySelector(".dh-legend"), c = this.column(this.colourBy);
      if (this.legendKind === "density" || !c) {
        el.innerHTML = '<span class="dh-ramp"></span> particles per pixel (log scale)';
      } else if (this.legendKind === "numeric") {
        el.innerHTML = `<span class="dh-ramp"></span> ${c.label}: ${fmt(c.lo)} … ${fmt(c.hi)} (1st–99th percentile)`;
      } else {
        const [all, sel] = this.levelCounts(c);
        el.innerHTML = c.levels.map((lv, k) => `<span class="dh-sw" style="background:rgb(${lv.rgb})"></span>${lv.label} ` +
          `<span class="dh-n">${fmt(all[k])}${this.selMask ? " / " + fmt(sel[k]) + " selected" : ""}</span>`).join(" ");
      }
      const ramp = el.querySelector(".dh-ramp");
      if (ramp) ramp.style.background = `linear-gradient(90deg, ${[0, 64, 128, 192, 255].map(k => `rgb(${this.meta.ramp[k]})`).join(",")})`;
    }

    // ------------------------------------------------------------------ selection
    updateSelection() {
      if (!this.shapes.length) { this.selMask = null; this.count = 0; this.showCount(); this.render(); return; }
      const n = this.n, m = new Uint8Array(n), X = this.x, Y = this.y;
      for (const s of this.shapes) {
        if (s.type === "box") {
          const x0 = s.x[0], x1 = s.x[1], y0 = s.y[0], y1 = s.y[1];
          for (let i = 0; i < n; i++) { const x = X[i], y = Y[i]; if (x >= x0 && x <= x1 && y >= y0 && y <= y1) m[i] = 1; }
        } else {
          const bb = lassoBBox(s.points);
          for (let i = 0; i < n; i++) if (!m[i] && insideLasso(s.points, bb, X[i], Y[i])) m[i] = 1;
        }
      }
      let c = 0;
      for (let i = 0; i < n; i++) c += m[i];
      this.selMask = m; this.count = c;
      this.showCount();
      this.render();
    }

    addShape(shape, replace) {
      if (replace) this.shapes = [];
      this.shapes.push(shape);
      this.updateSelection();
    }

    /** Select the particles in a box given in data coordinates (for scripts and tests). */
    selectBox(x0, x1, y0, y1, add) { this.addShape({ type: "box", x: [Math.min(x0, x1), Math.max(x0, x1)], y: [Math.min(y0, y1), Math.max(y0, y1)] }, !add); return this.count; }

    clearSelection(render = true) { this.shapes = []; this.selMask = null; this.count = 0; this.showCount(); if (render) this.render(); }

    showCount() {
      const el = this.root.querySelector(".dh-count");
      if (!el) return;
      el.textContent = this.shapes.length ? `${fmt(this.count)} of ${fmt(this.n)} particles selected (${(100 * this.count / this.n).toFixed(2)} %) in ${this.shapes.length} shape(s)`
        : `${fmt(this.n)} particles · drag to select (shift adds a shape)`;
      this.root.querySelector(".dh-save").disabled = !this.shapes.length;
    }

    /** The saved selection (format of deephemnma.core.selection.load_selection). */
    selectionDoc() {
      const doc = { format: "deephemnma-selection", version: 1, axes: [this.xname, this.yname],
        shapes: this.shapes.map(s => JSON.parse(JSON.stringify(s))), combine: "union", count: this.count,
        landscape: this.meta.landscape, created: new Date().toISOString(),
        command: `deephemnma select --particles ${this.meta.landscape.path} --selection selection.json --out selection.star` };
      if (this.count <= MAX_SAVED_INDICES && this.selMask) {
        const idx = [];
        for (let i = 0; i < this.n; i++) if (this.selMask[i]) idx.push(i);
        doc.indices = idx;
      }
      return doc;
    }

    save() {
      const blob = new Blob([JSON.stringify(this.selectionDoc(), null, 1)], { type: "application/json" });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob); a.download = "selection.json";
      document.body.appendChild(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    }

    // ------------------------------------------------------------------ hover
    pick(sx, sy) {
      const p = this.plot, dpr = this.dpr, top = this.acc.top;
      const cx = Math.floor((sx - p.x) * dpr), cy = Math.floor((sy - p.y) * dpr), R = Math.ceil(5 * dpr);
      let best = -1, bestD = Infinity;
      for (let dy = -R; dy <= R; dy++) for (let dx = -R; dx <= R; dx++) {
        const qx = cx + dx, qy = cy + dy;
        if (qx < 0 || qy < 0 || qx >= this.W || qy >= this.H) continue;
        const i = top[qy * this.W + qx];
        if (i < 0) continue;
        const [px, py] = this.toScreen(this.x[i], this.y[i]), d = (px - sx) ** 2 + (py - sy) ** 2;
        if (d < bestD) { bestD = d; best = i; }
      }
      return best;
    }

    imageName(i) {
      const nm = this.meta.names;
      if (!nm) return null;
      if (nm.list) return nm.list[i];
      const num = this.arrays.__image_number[i], stack = nm.stacks[this.arrays.__image_stack[i]];
      return stack === "" ? String(num) : String(num).padStart(nm.width, "0") + "@" + stack;
    }

    particleHTML(i) {
      const rows = [["row", (i + 1).toLocaleString("en-US")]];
      const name = this.imageName(i);
      if (name !== null) rows.push(["image", name]);
      for (const c of this.meta.columns) {
        if (!this.arrays[c.name] || c.hidden) continue;
        let v = this.value(c.name, i);
        if (c.kind === "category") { const lv = c.levels.find(l => l.value === v); v = lv ? lv.label : v; }
        rows.push([c.label, fmt(v)]);
      }
      return "<table>" + rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("") + "</table>";
    }

    showTip(i, sx, sy) {
      if (i < 0) { this.tip.hidden = true; return; }
      this.tip.innerHTML = this.particleHTML(i);
      this.tip.hidden = false;
      const left = sx + 16 + this.tip.offsetWidth > this.cssW ? sx - 16 - this.tip.offsetWidth : sx + 16;
      this.tip.style.left = Math.max(0, left) + "px"; this.tip.style.top = Math.max(0, sy - 10) + "px";
    }

    // ------------------------------------------------------------------ events
    bindControls() {
      const q = s => this.root.querySelector(s);
      const fill = (sel, names, value) => { sel.innerHTML = names.map(([v, l]) => `<option value="${v}">${l}</option>`).join(""); sel.value = value; };
      const coordOpts = this.coords.map(c => [c.name, c.label]);
      fill(q(".dh-x"), coordOpts, this.xname); fill(q(".dh-y"), coordOpts, this.yname);
      const colourOpts = [["density", "density"]].concat(this.meta.columns.filter(c => c.kind !== "coord").map(c => [c.name, c.label]));
      fill(q(".dh-colour"), colourOpts, this.colourBy);
      q(".dh-x").onchange = e => { this.setAxes(e.target.value, this.yname); this.render(); };
      q(".dh-y").onchange = e => { this.setAxes(this.xname, e.target.value); this.render(); };
      q(".dh-colour").onchange = e => { this.setColour(e.target.value); this.render(); };
      this.root.querySelectorAll("[data-mode]").forEach(b => b.onclick = () => this.setMode(b.dataset.mode));
      q(".dh-reset").onclick = () => { this.view = Object.assign({}, this.home); this.render(); };
      q(".dh-clear").onclick = () => this.clearSelection();
      q(".dh-save").onclick = () => this.save();
      this.setMode("box");
      this.showCount();
    }

    setMode(mode) {
      this.mode = mode;
      this.root.querySelectorAll("[data-mode]").forEach(b => b.classList.toggle("on", b.dataset.mode === mode));
      this.overlay.style.cursor = mode === "pan" ? "grab" : "crosshair";
    }

    local(e) { const r = this.overlay.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }

    bindPointer() {
      const ov = this.overlay;
      ov.addEventListener("pointerdown", e => {
        const [sx, sy] = this.local(e);
        ov.setPointerCapture(e.pointerId);
        this.drag = { sx, sy, add: e.shiftKey, view: Object.assign({}, this.view), pts: [this.toData(sx, sy)], shape: null };
      });
      ov.addEventListener("pointermove", e => {
        const [sx, sy] = this.local(e);
        if (!this.drag) { this.scheduleHover(sx, sy); return; }
        const d = this.drag, [x, y] = this.toData(sx, sy), [x0, y0] = this.toData(d.sx, d.sy);
        if (this.mode === "pan") {
          const v = d.view, p = this.plot, dx = (sx - d.sx) / p.w * (v.x1 - v.x0), dy = (sy - d.sy) / p.h * (v.y1 - v.y0);
          this.view = { x0: v.x0 - dx, x1: v.x1 - dx, y0: v.y0 + dy, y1: v.y1 + dy };
          this.render();
          return;
        }
        if (this.mode === "box") d.shape = { type: "box", x: [Math.min(x0, x), Math.max(x0, x)], y: [Math.min(y0, y), Math.max(y0, y)] };
        else { d.pts.push([x, y]); d.shape = { type: "lasso", points: d.pts }; }
        this.drawOverlay();
      });
      ov.addEventListener("pointerup", e => {
        const d = this.drag; this.drag = null;
        if (!d || this.mode === "pan" || !d.shape) { this.drawOverlay(); return; }
        if (this.shapeSize(d.shape) > 3) this.addShape(d.shape, !d.add);
        else this.drawOverlay();  // a click, not a shape
      });
      ov.addEventListener("pointerleave", () => { this.hover = -1; this.tip.hidden = true; this.drawOverlay(); });
      ov.addEventListener("wheel", e => {
        e.preventDefault();
        const [sx, sy] = this.local(e), [cx, cy] = this.toData(sx, sy), f = Math.exp(e.deltaY * 0.0015), v = this.view;
        this.view = { x0: cx - (cx - v.x0) * f, x1: cx + (v.x1 - cx) * f, y0: cy - (cy - v.y0) * f, y1: cy + (v.y1 - cy) * f };
        this.render();
      }, { passive: false });
      ov.addEventListener("dblclick", () => { this.view = Object.assign({}, this.home); this.render(); });
    }

    /** Largest screen extent (CSS px) of a shape being drawn; lassos need 3 points. */
    shapeSize(s) {
      const pts = s.type === "box" ? [[s.x[0], s.y[0]], [s.x[1], s.y[1]]] : s.points;
      if (s.type === "lasso" && pts.length < 3) return 0;
      const scr = pts.map(([x, y]) => this.toScreen(x, y)), xs = scr.map(p => p[0]), ys = scr.map(p => p[1]);
      return Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys));
    }

    scheduleHover(sx, sy) {
      this.hoverAt = [sx, sy];
      if (this.hoverPending) return;
      this.hoverPending = true;
      requestAnimationFrame(() => {
        this.hoverPending = false;
        const [hx, hy] = this.hoverAt, i = this.pick(hx, hy);
        if (i !== this.hover) { this.hover = i; this.drawOverlay(); }
        this.showTip(i, hx, hy);
      });
    }
  }

  window.DHLandscape = Landscape;
})();
