(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);

  /* the comparison: two images in one frame, the top one (B) shown right of the divider */
  var frame = document.getElementById("compare-frame");
  var compare = null;
  if (frame) {
    var selA = document.getElementById("compare-a"), selB = document.getElementById("compare-b");
    var selImage = document.getElementById("compare-image");
    var imgA = document.getElementById("compare-a-img"), imgB = document.getElementById("compare-b-img");
    var topLayer = document.getElementById("compare-top"), divider = document.getElementById("divider");
    var labelA = document.getElementById("label-a"), labelB = document.getElementById("label-b");
    var split = 0.5, zoom = 1, tx = 0, ty = 0, drag = null, fit = 1;

    var choices = function (image) {
      var list = [];
      if (image.lr.bicubic) list.push({ value: "lr:bicubic", text: "input, upscaled (bicubic)", src: image.lr.bicubic });
      if (image.lr.nearest) list.push({ value: "lr:nearest", text: "input, upscaled (nearest)", src: image.lr.nearest });
      data.jobs.forEach(function (job) {
        var src = job.images[image.key];
        if (src) list.push({ value: "job:" + job.job, text: "job " + job.job + (job.best ? " (best)" : "") + ": " + job.label, src: src, best: job.best });
      });
      return list;
    };
    var fill = function (select, list, preferred) {
      var keep = select.value;
      select.replaceChildren();
      list.forEach(function (c) { select.add(new Option(c.text, c.value)); });
      var values = list.map(function (c) { return c.value; });
      select.value = values.indexOf(keep) >= 0 ? keep : (values.indexOf(preferred) >= 0 ? preferred : values[0]);
    };
    var current = function () { return data.images[Number(selImage.value) || 0]; };
    var byValue = function (list, value) { return list.filter(function (c) { return c.value === value; })[0]; };
    var show = function () {
      var list = choices(current());
      var a = byValue(list, selA.value), b = byValue(list, selB.value);
      if (a) { if (imgA.getAttribute("src") !== a.src) imgA.src = a.src; labelA.textContent = "A: " + a.text; }
      if (b) { if (imgB.getAttribute("src") !== b.src) imgB.src = b.src; labelB.textContent = "B: " + b.text; }
    };
    var setup = function () {
      var list = choices(current());
      var jobs = list.filter(function (c) { return c.value.indexOf("job:") === 0; });
      var best = jobs.filter(function (c) { return c.best; })[0] || jobs[jobs.length - 1] || list[0];
      var other = list.filter(function (c) { return c !== best; })[0] || best;
      fill(selA, list, other ? other.value : "");
      fill(selB, list, best ? best.value : "");
      show();
    };
    var apply = function () {
      var t = "translate(" + tx + "px, " + ty + "px) scale(" + zoom + ")";
      imgA.style.transform = t; imgB.style.transform = t;
      frame.classList.toggle("zoomed", zoom * fit > 1.001);
      topLayer.style.clipPath = "inset(0 0 0 " + (split * 100).toFixed(2) + "%)";
      divider.style.left = (split * 100).toFixed(2) + "%";
      divider.setAttribute("aria-valuenow", String(Math.round(split * 100)));
    };
    var clampPan = function () {
      var w = frame.clientWidth, h = frame.clientHeight;
      tx = Math.min(0, Math.max(w - w * zoom, tx));
      ty = Math.min(0, Math.max(h - h * zoom, ty));
    };
    imgA.addEventListener("load", function () {
      var w = imgA.naturalWidth, h = imgA.naturalHeight;
      if (!w || !h) return;
      var room = frame.parentElement.clientWidth || 512;
      fit = Math.max(1, Math.min(8, Math.floor(Math.min(room, 768) / w))) || 1;
      frame.style.width = Math.min(room, w * fit) + "px";
      frame.style.aspectRatio = w + " / " + h;
      apply();
    });
    frame.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) return;
      drag = { mode: e.target === divider ? "split" : "pan", x: e.clientX, y: e.clientY, tx: tx, ty: ty };
      if (drag.mode === "pan") frame.classList.add("panning");
      frame.setPointerCapture(e.pointerId);
      e.preventDefault();
    });
    frame.addEventListener("pointermove", function (e) {
      if (!drag) return;
      var rect = frame.getBoundingClientRect();
      if (drag.mode === "split") {
        split = Math.min(1, Math.max(0, (e.clientX - rect.left) / rect.width));
      } else {
        tx = drag.tx + e.clientX - drag.x; ty = drag.ty + e.clientY - drag.y; clampPan();
      }
      apply();
    });
    var end = function () { drag = null; frame.classList.remove("panning"); };
    frame.addEventListener("pointerup", end);
    frame.addEventListener("pointercancel", end);
    frame.addEventListener("wheel", function (e) {
      e.preventDefault();
      var rect = frame.getBoundingClientRect();
      var cx = e.clientX - rect.left, cy = e.clientY - rect.top;
      var next = Math.min(64, Math.max(1, zoom * Math.exp(-e.deltaY * 0.0015)));
      tx = cx - (cx - tx) * (next / zoom); ty = cy - (cy - ty) * (next / zoom); zoom = next;
      clampPan(); apply();
    }, { passive: false });
    frame.addEventListener("dblclick", function () { zoom = 1; tx = 0; ty = 0; apply(); });
    divider.addEventListener("keydown", function (e) {
      var step = e.shiftKey ? 0.1 : 0.02;
      if (e.key === "ArrowLeft") split = Math.max(0, split - step);
      else if (e.key === "ArrowRight") split = Math.min(1, split + step);
      else return;
      e.preventDefault(); apply();
    });
    selA.addEventListener("change", show);
    selB.addEventListener("change", show);
    selImage.addEventListener("change", setup);
    setup(); apply();
    compare = { image: selImage, b: selB, setup: setup, show: show };
  }

  /* a tile's image: compare it as B */
  document.querySelectorAll(".tile img[data-key]").forEach(function (img) {
    img.addEventListener("click", function () {
      if (!compare) return;
      var key = img.getAttribute("data-key");
      var at = data.images.map(function (i) { return i.key; }).indexOf(key);
      if (at < 0) return;
      if (Number(compare.image.value) !== at) { compare.image.value = String(at); compare.setup(); }
      compare.b.value = "job:" + img.closest(".tile").getAttribute("data-job");
      compare.show();
      frame.scrollIntoView({ behavior: "smooth", block: "center" });
    });
  });

  /* the metrics table: click a header to sort (numbers as numbers, missing last) */
  var table = document.getElementById("metrics-table");
  if (table) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var key = function (row, column) {
      var cell = row.cells[column];
      if (cell.hasAttribute("data-num")) return Number(cell.getAttribute("data-num"));
      if (cell.hasAttribute("data-text")) return cell.getAttribute("data-text");
      return null;
    };
    var order = function (a, b) {
      if (typeof a === "number" && typeof b === "number") return a - b;
      if (typeof a === "number") return -1;
      if (typeof b === "number") return 1;
      return String(a).localeCompare(String(b), undefined, { numeric: true });
    };
    headers.forEach(function (th, column) {
      th.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (ra, rb) {
          var a = key(ra, column), b = key(rb, column);
          if (a === null || b === null) return (a === null) - (b === null);
          return descending ? order(b, a) : order(a, b);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }
})();
