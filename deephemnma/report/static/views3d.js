/* deephemnma results page: 3D views with NGL (vendored, MIT licence).
 *
 * Maps: each group's map (embedded MRC, binned for the page) as an isosurface whose level is set
 * in units of the map's standard deviation. Motions: each axis's multi-model PDB (results/animate)
 * loaded as a trajectory, played frame by frame. Each viewer starts when it scrolls into view.
 */
"use strict";

(function () {
  function onVisible(el, start) {
    if (!("IntersectionObserver" in window)) { start(); return; }
    const io = new IntersectionObserver(entries => {
      if (entries.some(e => e.isIntersecting)) { io.disconnect(); start(); }
    }, { rootMargin: "200px" });
    io.observe(el);
  }

  function newStage(el) {
    const stage = new NGL.Stage(el.querySelector(".dh-stage"), { backgroundColor: "white", tooltip: false });
    new ResizeObserver(() => stage.handleResize()).observe(el.querySelector(".dh-stage"));
    return stage;
  }

  /** A 3D viewer of one of several embedded items (picked in a <select>), started when visible. */
  class Viewer {
    constructor(el, items, bytes, pick) {
      this.el = el; this.items = items; this.bytes = bytes; this.loaded = false;
      this.pick = el.querySelector(pick);
      this.pick.innerHTML = items.map((m, k) => `<option value="${k}">${m.label}</option>`).join("");
      this.pick.onchange = () => this.show(+this.pick.value);
    }

    /** Start when scrolled into view (called last by each subclass's constructor). */
    watch() { onVisible(this.el, () => this.start()); }

    start() {
      if (this.stage) return this.ready;
      this.stage = newStage(this.el);
      this.ready = this.show(0);
      return this.ready;
    }

    /** Replace what is shown by item k's embedded file; returns NGL's component. */
    async load(k, params) {
      const m = this.items[k];
      this.loaded = false;
      this.stage.removeAllComponents();
      const data = await this.bytes(m.id);
      return this.stage.loadFile(new Blob([data]), Object.assign({ name: m.name }, params));
    }

    /** Frame the component and mark the viewer loaded (tests wait for data-loaded). */
    done(comp, m) {
      comp.autoView();
      this.loaded = true;
      this.el.dataset.loaded = m.name;
    }
  }

  class MapViewer extends Viewer {
    constructor(el, maps, bytes) {
      super(el, maps, bytes, ".dh-map-pick");
      this.level = el.querySelector(".dh-level");
      this.levelOut = el.querySelector(".dh-level-out");
      this.level.oninput = () => this.setLevel(+this.level.value);
      this.watch();
    }

    async show(k) {
      const m = this.items[k], comp = await this.load(k, { ext: "mrc" });
      this.level.value = m.level;
      this.repr = comp.addRepresentation("surface", { isolevelType: "sigma", isolevel: m.level,
        color: `rgb(${m.rgb.join(",")})`, opacity: 1.0, smooth: 1 });
      this.map = m;
      this.setLevel(m.level);
      this.done(comp, m);
    }

    setLevel(v) {
      if (this.repr) this.repr.setParameters({ isolevel: v });
      const m = this.map;
      this.levelOut.textContent = m ? `${v.toFixed(1)} σ = ${(m.mean + v * m.std).toPrecision(3)} (map units)` : "";
    }
  }

  class MotionViewer extends Viewer {
    constructor(el, anims, bytes) {
      super(el, anims, bytes, ".dh-anim-pick");
      this.timer = null;
      this.frame = el.querySelector(".dh-frame");
      this.frameOut = el.querySelector(".dh-frame-out");
      this.play = el.querySelector(".dh-play");
      this.frame.oninput = () => { this.stop(); this.setFrame(+this.frame.value); };
      this.play.onclick = () => (this.timer ? this.stop() : this.start_play());
      this.watch();
    }

    async show(k) {
      const a = this.items[k];
      this.stop();
      const comp = await this.load(k, { ext: "pdb", asTrajectory: true });
      comp.addRepresentation(a.representation, { colorScheme: "bfactor", colorScale: "RdYlBu", colorReverse: true,
        colorDomain: [0, Math.max(a.max_displacement || 1, 1e-3)] });
      this.traj = comp.addTrajectory();
      this.anim = a;
      this.frame.max = a.frames - 1;
      this.setFrame(Math.floor((a.frames - 1) / 2));
      this.done(comp, a);
    }

    setFrame(f) {
      this.current = f;
      this.frame.value = f;
      if (this.traj) this.traj.trajectory.setFrame(f);
      const a = this.anim, pos = a && a.positions ? ` (${a.axis} = ${a.positions[f].toPrecision(3)})` : "";
      this.frameOut.textContent = a ? `frame ${f + 1} of ${a.frames}${pos}` : "";
    }

    start_play() {
      let dir = 1;
      this.play.textContent = "❚❚ pause";
      this.timer = setInterval(() => {
        let f = this.current + dir;
        if (f >= this.anim.frames || f < 0) { dir = -dir; f = this.current + dir; }
        this.setFrame(f);
      }, 120);
    }

    stop() {
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
      this.play.textContent = "▶ play";
    }
  }

  class Views3D {
    constructor(meta, bytes) {
      const probe = document.createElement("canvas");
      const why = typeof NGL === "undefined" ? "the NGL library, which this page was built without"
        : !(probe.getContext("webgl2") || probe.getContext("webgl")) ? "WebGL, which this browser does not offer" : null;
      if (why) {
        document.querySelectorAll(".dh-3d").forEach(el => el.insertAdjacentHTML("beforeend",
          `<p class="warn">3D views need ${why}; the maps and animations are in results/maps and results/animate.</p>`));
        return;
      }
      const mapEl = document.getElementById("dh-maps3d"), animEl = document.getElementById("dh-motion3d");
      if (mapEl && meta.maps.length) this.maps = new MapViewer(mapEl, meta.maps, bytes);
      if (animEl && meta.animations.length) this.motion = new MotionViewer(animEl, meta.animations, bytes);
    }
  }

  window.DHViews3D = Views3D;
})();
