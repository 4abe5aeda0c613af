// wdiff scene viewer: a small WebGL point viewer, no libraries, no network.
// Data comes from the <script type="application/json" id="wdiff-data"> block written by wdiff.scene.html.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("wdiff-data").textContent);
  const canvas = document.getElementById("view");
  const tip = document.getElementById("tip");
  const labelLayer = document.getElementById("labels");

  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const pos = new Uint16Array(bytes(data.positions).buffer);  // x, y, z quantized over the box
  const rgb = bytes(data.colors);
  const values = new Float32Array(bytes(data.values).buffer);
  const owner = new Uint32Array(bytes(data.tensor_index).buffer);
  const n = values.length;
  const lo = data.box_min, ext = data.box_extent;
  const xyz = new Float32Array(3 * n);
  for (let i = 0; i < 3 * n; i++) xyz[i] = lo[i % 3] + (pos[i] / 65535) * ext[i % 3];

  const gl = canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true });
  if (!gl) {
    document.getElementById("nogl").style.display = "block";
    document.body.dataset.status = "no-webgl";
    return;
  }
  function shader(type, src) {
    const s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    return s;
  }
  function program(vs, fs) {
    const p = gl.createProgram();
    gl.attachShader(p, shader(gl.VERTEX_SHADER, vs));
    gl.attachShader(p, shader(gl.FRAGMENT_SHADER, fs));
    gl.linkProgram(p);
    if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(p));
    return p;
  }
  const points = program(
    "attribute vec3 p; attribute vec3 c; uniform mat4 m; uniform float s; varying vec3 v;" +
      "void main(){ gl_Position = m * vec4(p, 1.0); gl_PointSize = clamp(s / gl_Position.w, 1.0, 48.0); v = c; }",
    "precision mediump float; varying vec3 v; void main(){ gl_FragColor = vec4(v, 1.0); }"
  );
  const lines = program(
    "attribute vec3 p; uniform mat4 m; void main(){ gl_Position = m * vec4(p, 1.0); }",
    "precision mediump float; uniform vec3 c; void main(){ gl_FragColor = vec4(c, 1.0); }"
  );
  function buffer(array) {
    const b = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, b);
    gl.bufferData(gl.ARRAY_BUFFER, array, gl.STATIC_DRAW);
    return b;
  }
  const posBuf = buffer(xyz), colBuf = buffer(rgb);
  const frameXYZ = [];
  for (const b of data.blocks) {
    const [l, r, t, bo] = b.frame, z = b.z;
    const c = [[l, t], [r, t], [r, bo], [l, bo]];
    for (let k = 0; k < 4; k++) frameXYZ.push(...c[k], z, ...c[(k + 1) % 4], z);
  }
  const lineBuf = buffer(new Float32Array(frameXYZ));

  // camera: orbit around the centre of the model
  const view = { yaw: data.camera.azimuth, pitch: data.camera.elevation, dist: 1.0 };
  const centre = [lo[0] + ext[0] / 2, lo[1] + ext[1] / 2, lo[2] + ext[2] / 2];
  const radius = 0.5 * Math.hypot(ext[0], ext[1], ext[2]) || 1;
  const fov = 30 * Math.PI / 180;
  view.dist = (radius / Math.sin(fov / 2)) * 0.75;
  const home = Object.assign({}, view);
  let mvp = null;

  function matrices() {
    const w = canvas.width, h = canvas.height;
    const yaw = view.yaw * Math.PI / 180, pitch = view.pitch * Math.PI / 180;
    const back = [Math.cos(pitch) * Math.sin(yaw), Math.sin(pitch), Math.cos(pitch) * Math.cos(yaw)];
    const eye = centre.map((c, i) => c + view.dist * back[i]);
    const f = back.map((v) => -v);
    let r = [f[1] * 0 - f[2] * 1, f[2] * 0 - f[0] * 0, f[0] * 1 - f[1] * 0];
    const rl = Math.hypot(...r) || 1;
    r = r.map((v) => v / rl);
    const u = [r[1] * f[2] - r[2] * f[1], r[2] * f[0] - r[0] * f[2], r[0] * f[1] - r[1] * f[0]];
    const near = Math.max(view.dist - 1.5 * radius, view.dist * 0.01), far = view.dist + 1.5 * radius;
    const t = 1 / Math.tan(fov / 2), a = w / h;
    const dot = (x, y) => x[0] * y[0] + x[1] * y[1] + x[2] * y[2];
    // column-major view and projection
    const V = [r[0], u[0], -f[0], 0, r[1], u[1], -f[1], 0, r[2], u[2], -f[2], 0, -dot(r, eye), -dot(u, eye), dot(f, eye), 1];
    const P = [t / a, 0, 0, 0, 0, t, 0, 0, 0, 0, (far + near) / (near - far), -1, 0, 0, (2 * far * near) / (near - far), 0];
    const M = new Float32Array(16);
    for (let i = 0; i < 4; i++)
      for (let j = 0; j < 4; j++) {
        let s = 0;
        for (let k = 0; k < 4; k++) s += P[k * 4 + j] * V[i * 4 + k];
        M[i * 4 + j] = s;
      }
    return { M, focal: (h / 2) * t };
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * dpr), h = Math.round(canvas.clientHeight * dpr);
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    gl.viewport(0, 0, w, h);
    const bg = data.background;
    gl.clearColor(bg[0], bg[1], bg[2], 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    gl.enable(gl.DEPTH_TEST);
    const { M, focal } = matrices();
    mvp = M;
    gl.useProgram(lines);
    gl.uniformMatrix4fv(gl.getUniformLocation(lines, "m"), false, M);
    gl.uniform3fv(gl.getUniformLocation(lines, "c"), data.frame_rgb);
    gl.bindBuffer(gl.ARRAY_BUFFER, lineBuf);
    const lp = gl.getAttribLocation(lines, "p");
    gl.enableVertexAttribArray(lp);
    gl.vertexAttribPointer(lp, 3, gl.FLOAT, false, 0, 0);
    gl.drawArrays(gl.LINES, 0, frameXYZ.length / 3);
    gl.disableVertexAttribArray(lp);
    gl.useProgram(points);
    gl.uniformMatrix4fv(gl.getUniformLocation(points, "m"), false, M);
    gl.uniform1f(gl.getUniformLocation(points, "s"), data.cell * focal * 1.4);
    const pp = gl.getAttribLocation(points, "p"), pc = gl.getAttribLocation(points, "c");
    gl.bindBuffer(gl.ARRAY_BUFFER, posBuf);
    gl.enableVertexAttribArray(pp);
    gl.vertexAttribPointer(pp, 3, gl.FLOAT, false, 0, 0);
    gl.bindBuffer(gl.ARRAY_BUFFER, colBuf);
    gl.enableVertexAttribArray(pc);
    gl.vertexAttribPointer(pc, 3, gl.UNSIGNED_BYTE, true, 0, 0);
    gl.drawArrays(gl.POINTS, 0, n);
    placeLabels();
    document.body.dataset.status = "drawn";
  }

  function project(x, y, z) {
    const M = mvp, w = canvas.clientWidth, h = canvas.clientHeight;
    const cx = M[0] * x + M[4] * y + M[8] * z + M[12], cy = M[1] * x + M[5] * y + M[9] * z + M[13];
    const cw = M[3] * x + M[7] * y + M[11] * z + M[15];
    return [((cx / cw + 1) / 2) * w, ((1 - cy / cw) / 2) * h, cw];
  }

  function placeLabels() {
    labelLayer.textContent = "";
    for (const b of data.blocks) {
      // the top corner that is on the left on screen (the frame's right edge seen from behind)
      const a = project(b.frame[0], b.frame[2], b.z), c = project(b.frame[1], b.frame[2], b.z);
      const [x, y, w] = a[0] <= c[0] ? a : c;
      if (w <= 0) continue;
      const d = document.createElement("div");
      d.className = "label";
      d.textContent = b.label;
      d.style.left = x + "px";
      d.style.top = y + "px";
      labelLayer.appendChild(d);
    }
  }

  // picking: the nearest point under the cursor (within a few pixels), front-most first
  function pick(mx, my) {
    let best = -1, bestD = 1e9, bestW = 1e30;
    const M = mvp, w = canvas.clientWidth, h = canvas.clientHeight;
    for (let i = 0; i < n; i++) {
      const x = xyz[3 * i], y = xyz[3 * i + 1], z = xyz[3 * i + 2];
      const cw = M[3] * x + M[7] * y + M[11] * z + M[15];
      if (cw <= 0) continue;
      const sx = ((M[0] * x + M[4] * y + M[8] * z + M[12]) / cw + 1) * w / 2;
      const sy = (1 - (M[1] * x + M[5] * y + M[9] * z + M[13]) / cw) * h / 2;
      const d = Math.abs(sx - mx) + Math.abs(sy - my);
      const r = Math.max(3, (data.cell * (h / 2) / Math.tan(fov / 2)) / cw / 2 + 1);
      if (d <= r && (cw < bestW - 1e-6 || (Math.abs(cw - bestW) <= 1e-6 && d < bestD))) {
        best = i; bestD = d; bestW = cw;
      }
    }
    return best < 0 ? null : describe(best);
  }

  function describe(i) {
    const t = data.tensors[owner[i]];
    const local = i - t.start, gi = Math.floor(local / t.grid[1]), gj = local % t.grid[1];
    const r0 = gi * t.block[0], r1 = Math.min(r0 + t.block[0], t.rows);
    const c0 = gj * t.block[1], c1 = Math.min(c0 + t.block[1], t.cols);
    const index = r1 - r0 === 1 && c1 - c0 === 1 ? `[${r0}, ${c0}]` : `rows ${r0}..${r1 - 1}, cols ${c0}..${c1 - 1}`;
    return { point: i, tensor: t.name, shape: t.shape, index, value: values[i] };
  }

  function fmt(v) {
    if (!isFinite(v)) return String(v);
    return Math.abs(v) >= 0.01 && Math.abs(v) < 1000 ? v.toPrecision(4) : v.toExponential(3);
  }

  let dragging = null, pending = null;
  canvas.addEventListener("mousedown", (e) => { dragging = [e.clientX, e.clientY]; });
  window.addEventListener("mouseup", () => { dragging = null; });
  window.addEventListener("mousemove", (e) => {
    if (dragging) {
      view.yaw -= (e.clientX - dragging[0]) * 0.3;
      view.pitch = Math.max(-89, Math.min(89, view.pitch + (e.clientY - dragging[1]) * 0.3));
      dragging = [e.clientX, e.clientY];
      tip.style.display = "none";
      requestAnimationFrame(draw);
      return;
    }
    const rect = canvas.getBoundingClientRect();
    if (pending === null)
      pending = requestAnimationFrame(() => {
        pending = null;
        hover(e.clientX - rect.left, e.clientY - rect.top);
      });
  });
  function hover(x, y) {
    const hit = pick(x, y);
    if (!hit) { tip.style.display = "none"; return; }
    tip.innerHTML = "";
    const lines = [hit.tensor, `shape [${hit.shape.join(", ")}], ${hit.index}`, `${data.quantity}: ${fmt(hit.value)}`];
    for (const text of lines) { const d = document.createElement("div"); d.textContent = text; tip.appendChild(d); }
    tip.style.left = x + 14 + "px";
    tip.style.top = y + 14 + "px";
    tip.style.display = "block";
  }
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    view.dist *= Math.exp(e.deltaY * 0.001);
    requestAnimationFrame(draw);
  }, { passive: false });
  canvas.addEventListener("dblclick", () => { Object.assign(view, home); requestAnimationFrame(draw); });
  window.addEventListener("resize", () => requestAnimationFrame(draw));

  window.wdiffViewer = { pick: (x, y) => pick(x, y), rotate: (d) => { view.yaw += d; draw(); }, points: n, view };
  draw();
})();
