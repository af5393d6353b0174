"""Synthetic chest radiographs whose CheXpert findings a small CNN can learn: each image drawn from the marks
its labels ask for (label_table.py's `Cohort.signs`).

Each finding leaves its own mark, sized to stay visible at 96 px:
Cardiomegaly a wider heart; Enlarged Cardiomediastinum a widened upper mediastinum; Pleural Effusion
basal whiteout with a meniscus that blunts the costophrenic angle; Pneumothorax a lucent apical rim
without lung markings and a thin pleural line; Support Devices bright tubes, wires, leads, a
pacemaker; Consolidation a dense irregular patch with air bronchograms; Edema bilateral perihilar
haze; Pneumonia a lower-zone cluster of fluffy small opacities; Atelectasis plate-like bands; Lung
Lesion a sharp round nodule; Pleural Other thickening along the lateral (posterior on a lateral
view) chest wall; Fracture bright rib calluses stacked along the lateral chest wall.

Determinism: every image is drawn from RNGs derived from (seed, patient) and (seed, image index), so any
number of worker processes writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxrdist.data.synth.label_table import _STREAM_IMAGE, _STREAM_PATIENT, _STREAM_PERSISTENT_SIGN, _STREAM_SIGN, LABELS, PERSISTENT, Cohort

MARKINGS_SCALE = 0.15  # density of a full-white line on the lung-markings layer


# ------------------------------------------------------------------------------------- geometry


def _level(amp: float, scale: float = 1.0) -> int:
    """An 8-bit fill value for a line layer whose 255 means `scale` of density."""
    return max(0, min(255, round(amp / scale * 255)))


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 where d <= -width/2, 1 where d >= width/2."""
    x = d * np.float32(1.0 / width)
    x += np.float32(0.5)
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


class _Canvas:
    """A float32 image in normalised coordinates: u (left to right) and v (top to bottom) in [0, 1]."""

    def __init__(self, size: int):
        self.size = size
        self.px = 1.0 / size
        centers = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.u = centers[None, :]
        self.v = centers[:, None]
        self.img = np.zeros((size, size), dtype=np.float32)
        # Polylines go on two 8-bit layers added once at the end: `overlay` (devices, bones) on top of
        # everything, `markings` (vessels, septal lines) only inside the lungs.
        self.overlay = Image.new("L", (size, size), 0)
        self.markings = Image.new("L", (size, size), 0)
        self.draw_overlay = ImageDraw.Draw(self.overlay)
        self.draw_markings = ImageDraw.Draw(self.markings)

    def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        s = self.size
        j0, j1 = max(0, int(u0 * s)), min(s, int(np.ceil(u1 * s)) + 1)
        i0, i1 = max(0, int(v0 * s)), min(s, int(np.ceil(v1 * s)) + 1)
        return slice(i0, max(i0, i1)), slice(j0, max(j0, j1))

    def local(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.u[:, win[1]], self.v[win[0], :]

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, edge: float | None = None) -> np.ndarray:
        """Full-frame soft mask of an axis-aligned ellipse."""
        mask = np.zeros_like(self.img)
        win, values = self._ellipse_values(cx, cy, ax, ay, edge)
        mask[win] = values
        return mask

    def _ellipse_values(self, cx, cy, ax, ay, edge=None):
        edge = edge or 1.5 * self.px
        win = self.window(cx - ax - edge, cx + ax + edge, cy - ay - edge, cy + ay + edge)
        u, v = self.local(win)
        q = np.sqrt(((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2)
        return win, _ramp((1.0 - q) * min(ax, ay), edge)

    def add_ellipse(self, cx, cy, ax, ay, amp, mask=None, edge=None) -> None:
        win, values = self._ellipse_values(cx, cy, ax, ay, edge)
        self._add(win, amp * values, mask)

    def add_gaussian(self, cx, cy, sx, sy, amp, mask=None) -> None:
        win = self.window(cx - 3.5 * sx, cx + 3.5 * sx, cy - 3.5 * sy, cy + 3.5 * sy)
        u, v = self.local(win)
        self._add(win, amp * np.exp(-0.5 * (((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2)), mask)

    def add_segment(self, p0, p1, half_width, amp, mask=None) -> None:
        """A band of constant density along the segment p0-p1 (soft edges)."""
        pad = half_width + 2 * self.px
        win = self.window(min(p0[0], p1[0]) - pad, max(p0[0], p1[0]) + pad,
                          min(p0[1], p1[1]) - pad, max(p0[1], p1[1]) + pad)
        u, v = self.local(win)
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        t = np.clip(((u - p0[0]) * dx + (v - p0[1]) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        dist = np.hypot(u - p0[0] - t * dx, v - p0[1] - t * dy)
        self._add(win, amp * _ramp(half_width - dist, 1.5 * self.px), mask)

    def _add(self, win, values, mask) -> None:
        if mask is not None:
            values = values * mask[win]
        self.img[win] += values

    def xy(self, points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.size, y * self.size) for x, y in points]

    def width(self, w: float) -> int:
        return max(1, round(w * self.size))

    def finish(self, lungs: np.ndarray, hide: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        """Adds the line layers and a fine lung grain (not where `hide` is 1) to the image."""
        small = max(4, self.size // 8)
        grain = Image.fromarray(rng.standard_normal((small, small)).astype(np.float32), "F")
        texture = np.asarray(self.markings, dtype=np.float32) * np.float32(MARKINGS_SCALE / 255)
        texture += 0.025 * np.asarray(grain.resize((self.size, self.size), Image.BILINEAR))
        if hide is not None:
            texture *= 1.0 - hide
        self.img += texture * lungs
        self.img += np.asarray(self.overlay, dtype=np.float32) * np.float32(1 / 255)
        return self.img


@dataclass
class _Lung:
    cx: float
    cy: float
    ax: float
    ay: float
    side: int  # +1: the chest wall of this lung field is on the image right
    dome_top: float
    dome_cx: float
    dome_k: float
    hilum: tuple[float, float]
    medial_u: float | None = None  # frontal views: the lung ends here towards the midline
    mask: np.ndarray = field(default=None, repr=False)
    _costophrenic: tuple[float, float] | None = field(default=None, repr=False)

    def dome_v(self, u):
        return self.dome_top + self.dome_k * (u - self.dome_cx) ** 2

    def wall_u(self, v: float) -> float:
        """The chest wall of this lung field at height v."""
        t = np.clip((v - self.cy) / self.ay, -0.999, 0.999)
        return float(self.cx + self.side * self.ax * np.sqrt(1.0 - t * t))

    def costophrenic(self) -> tuple[float, float]:
        """The lateral angle where the diaphragm dome meets the chest wall."""
        if self._costophrenic is None:
            r = np.linspace(0.0, 1.0, 201)
            u = self.cx + self.side * r * self.ax
            wall = self.cy + self.ay * np.sqrt(1.0 - r * r)
            k = int(np.argmax(self.dome_v(u) >= wall))  # first point where the dome reaches the wall
            self._costophrenic = float(u[k]), float(wall[k])
        return self._costophrenic

    @property
    def apex_v(self) -> float:
        return self.cy - self.ay

    def at(self, f: float) -> float:
        """Height at fraction f of the way from the apex (0) to the costophrenic angle (1)."""
        return self.apex_v + f * (self.costophrenic()[1] - self.apex_v)

    def draw_mask(self, c: _Canvas) -> None:
        bottom = min(self.cy + self.ay, max(self.dome_v(self.cx - self.ax), self.dome_v(self.cx + self.ax))) + 2 * c.px
        win = c.window(self.cx - self.ax - 2 * c.px, self.cx + self.ax + 2 * c.px, self.apex_v - 2 * c.px, bottom)
        u, v = c.local(win)
        q = np.sqrt(((u - self.cx) / self.ax) ** 2 + ((v - self.cy) / self.ay) ** 2)
        local = _ramp((1.0 - q) * self.ax, 1.5 * c.px) * _ramp(self.dome_v(u) - v, 2 * c.px)
        if self.medial_u is not None:
            local *= _ramp(self.side * (u - self.medial_u), 2 * c.px)
        self.mask = np.zeros((c.size, c.size), dtype=np.float32)
        self.mask[win] = local

    def point(self, c: _Canvas, rng: np.random.Generator, zone=(0.1, 0.9), avoid: np.ndarray | None = None
              ) -> tuple[float, float]:
        """A random point well inside the lung field, in a band of its height, off `avoid`."""
        v0, v1 = (self.at(f) for f in zone)
        for _ in range(60):
            u = rng.uniform(self.cx - self.ax, self.cx + self.ax)
            v = rng.uniform(v0, v1)
            i, j = min(int(v * c.size), c.size - 1), min(int(u * c.size), c.size - 1)
            if self.mask[i, j] > 0.95 and (avoid is None or avoid[i, j] < 0.2):
                return u, v
        return self.cx + self.side * 0.4 * self.ax, self.at(0.5)


@dataclass
class _Anatomy:
    lateral: bool
    lungs: list[_Lung]
    heart: tuple[float, float, float, float]  # cx, cy, ax, ay
    trachea: tuple[tuple[float, float], tuple[float, float]]  # top, carina
    dome_level: float  # v of the lower hemidiaphragm top (abdomen below)
    heart_mask: np.ndarray = field(default=None, repr=False)
    lung_mask: np.ndarray = field(default=None, repr=False)


@dataclass(frozen=True)
class _Patient:
    """Body habitus, shared by all of a patient's images."""

    scale: float
    heart: float
    mediastinum: float
    rib_spacing: float
    body: float
    lung_dark: float


def _patient(seed: int, patient: int) -> _Patient:
    rng = np.random.default_rng([seed, _STREAM_PATIENT, patient])
    return _Patient(scale=rng.uniform(0.93, 1.04), heart=rng.uniform(0.92, 1.06), mediastinum=rng.uniform(0.04, 0.052),
                    rib_spacing=rng.uniform(0.058, 0.07), body=rng.uniform(0.34, 0.42),
                    lung_dark=rng.uniform(0.22, 0.27))


# -------------------------------------------------------------------------------------- anatomy


def _frontal(c: _Canvas, p: _Patient, view: str, rng: np.random.Generator, sign: dict[str, float]) -> _Anatomy:
    s = p.scale
    mid, top = 0.5 + rng.normal(0, 0.01), 0.085 + rng.normal(0, 0.012)
    inspiration = rng.uniform(0.95, 1.03) * (0.93 if view == "AP" else 1.0)
    lungs = []
    for side in (-1, 1):
        # the upper part of a tall ellipse, so the chest wall meets the dome in a sharp costophrenic angle
        ax, ay = 0.175 * s, 0.5 * s * inspiration
        cx, cy = mid + side * 0.195 * s, top + ay
        dome_top = top + 0.5 * s * inspiration - (0.015 if side < 0 else 0.0)  # right hemidiaphragm sits higher
        lungs.append(_Lung(cx=cx, cy=cy, ax=ax, ay=ay, side=side, dome_top=dome_top, dome_cx=cx - side * 0.03,
                           dome_k=0.11 / ax**2, hilum=(mid + side * 0.09 * s, top + 0.26 * s),
                           medial_u=mid + side * 0.035 * s))
        lungs[-1].draw_mask(c)
    big, ecm = sign["Cardiomegaly"], sign["Enlarged Cardiomediastinum"]
    heart_ax = 0.145 * s * p.heart * (1.06 if view == "AP" else 1.0) * (1 + 0.55 * big)
    heart_ay = 0.105 * s * (1 + 0.15 * big)
    heart = (mid + 0.045 * s + 0.03 * big, lungs[1].dome_top - 0.045, heart_ax, heart_ay)
    anat = _Anatomy(lateral=False, lungs=lungs, heart=heart, trachea=((mid, 0.0), (mid, top + 0.17)),
                    dome_level=lungs[1].dome_top)
    anat.lung_mask = lungs[0].mask + lungs[1].mask
    # left ventricle (image right) plus the smaller right-atrial bulge across the midline
    anat.heart_mask = np.maximum(c.ellipse(*heart, edge=3 * c.px),
                                 c.ellipse(mid - 0.02 * s, heart[1] - 0.02, 0.075 * s * (1 + 0.3 * big), 0.8 * heart_ay,
                                           edge=3 * c.px))

    # Each layer is computed only in its own window: the body and lungs cover the frame, the rest does not.
    d = np.abs(c.u - mid)  # (1, S)
    body_half = 0.09 + (0.48 * s - 0.09) * np.sqrt(np.clip((c.v + 0.02) / 0.13, 0.0, 1.0))  # neck to shoulders
    body = _ramp(body_half - d, 0.03)
    c.img += 0.04 + p.body * body
    c.img -= p.lung_dark * anat.lung_mask

    def dome(u):
        return np.where(u < mid, lungs[0].dome_v(u), lungs[1].dome_v(u))

    below = c.window(0.0, 1.0, min(lung.dome_top for lung in lungs) - 0.01, 1.0)
    u, v = c.local(below)
    c.img[below] += 0.05 * p.body * body[below] * _ramp(v - dome(u), 0.01)  # abdomen under the domes

    chest = c.window(mid - 0.4 * s, mid + 0.4 * s, top - 0.08, max(lung.costophrenic()[1] for lung in lungs) + 0.06)
    u, v = c.local(chest)
    du = np.abs(u - mid)
    phase = (v - 1.1 * du * du + 0.08 * du) / p.rib_spacing  # posterior ribs curve down laterally
    ribs = np.zeros_like(c.img)
    ribs[chest] = (0.08 * _ramp(0.37 * s - du, 0.03) * _ramp(v - top + 0.06, 0.02) * _ramp(dome(u) + 0.04 - v, 0.02)
                   * _ramp(0.16 - np.abs(phase - np.floor(phase) - 0.5), 0.12))
    c.img += ribs

    # mediastinum and heart: soft tissue in front of the lungs (which show through a quarter) and ribs
    hx, hy, hax, hay = heart
    widest = p.mediastinum * s + 0.07 * ecm + 0.01
    center = c.window(min(mid - widest, hx - hax, mid - 0.12 * s) - 0.02, max(mid + widest, hx + hax) + 0.02,
                      0.0, hy + hay + 0.02)
    u, v = c.local(center)
    du = np.abs(u - mid)
    width = p.mediastinum * s + 0.07 * ecm * np.exp(-(((v - top - 0.13) / 0.1) ** 2))  # (h, 1)
    soft = np.maximum(_ramp(width - du, 2 * c.px) * _ramp(hy - v, 0.05), anat.heart_mask[center])
    c.img[center] += soft * (0.2 + 0.75 * p.lung_dark * anat.lung_mask[center] - 0.7 * ribs[center])
    c.img[center] -= 0.09 * _ramp(0.013 - du, 2 * c.px) * (v < anat.trachea[1][1])  # tracheal air column
    c.img[center] += 0.04 * _ramp(0.03 * s - du, 2 * c.px) * (v < hy)  # spine through the mediastinum
    c.add_ellipse(mid + 0.14 * s, lungs[1].dome_top + 0.07, 0.045, 0.028, -0.14, edge=0.01)  # gastric bubble

    clavicle_v = top + (0.0 if view == "AP" else 0.035)
    for side in (-1, 1):
        c.draw_overlay.line(c.xy([(mid + side * 0.04, clavicle_v + 0.03), (mid + side * 0.18, clavicle_v),
                                  (mid + side * 0.36, clavicle_v - 0.04)]), fill=_level(0.1), width=c.width(0.022),
                            joint="curve")
    return anat


def _lateral(c: _Canvas, p: _Patient, rng: np.random.Generator, sign: dict[str, float]) -> _Anatomy:
    s = p.scale
    cx, top = 0.52 + rng.normal(0, 0.01), 0.1 + rng.normal(0, 0.012)
    ax, ay = 0.3 * s, 0.45 * s * rng.uniform(0.95, 1.03)
    lung = _Lung(cx=cx, cy=top + ay, ax=ax, ay=ay, side=1, dome_top=top + 0.48 * s, dome_cx=cx - 0.05,
                 dome_k=0.12 / ax**2, hilum=(cx, top + 0.25 * s))
    big, ecm = sign["Cardiomegaly"], sign["Enlarged Cardiomediastinum"]
    heart = (cx - 0.13 * s + 0.03 * big, lung.dome_top - 0.03, 0.13 * s * p.heart * (1 + 0.5 * big),
             0.12 * s * (1 + 0.2 * big))
    anat = _Anatomy(lateral=True, lungs=[lung], heart=heart, trachea=((cx - 0.06, 0.0), (cx - 0.01, top + 0.22 * s)),
                    dome_level=lung.dome_top)
    lung.draw_mask(c)
    anat.lung_mask = lung.mask
    anat.heart_mask = c.ellipse(*heart, edge=3 * c.px)

    u, v = c.u, c.v
    body = c.ellipse(0.5, 0.6, 0.45 * s, 0.7, edge=0.02)
    abdomen = _ramp(v - lung.dome_v(u), 0.01)
    front = c.ellipse(cx - 0.15 * s, top + 0.2 * s, 0.055 + 0.06 * ecm, 0.12, edge=0.03)  # anterior mediastinum
    soft = np.maximum(anat.heart_mask, 0.6 * front)
    ribs = np.abs((v + 0.35 * (u - cx)) / p.rib_spacing % 1.0 - 0.5)
    c.img += 0.04 + body * (p.body + 0.05 * abdomen + 0.05 * _ramp(0.16 - ribs, 0.12) * (1 - abdomen)) + 0.2 * soft
    c.img -= p.lung_dark * lung.mask * (1.0 - 0.75 * soft)
    spine_u = cx + 0.92 * ax
    vertebrae = np.abs(v / 0.06 % 1.0 - 0.5) < 0.4
    c.img += 0.12 * _ramp(0.045 * s - np.abs(u - spine_u), 2 * c.px) * (0.6 + 0.4 * vertebrae)
    c.add_segment((cx - 0.95 * ax, top + 0.08), (cx - 0.9 * ax, top + 0.45), 0.008, 0.1)  # sternum
    c.add_segment(*anat.trachea, 0.014, -0.08)
    return anat


def _vessels(c: _Canvas, anat: _Anatomy, rng: np.random.Generator) -> None:
    """Pulmonary vessels fanning out of the hila."""
    draw, trunk, branch = c.draw_markings, _level(0.07, MARKINGS_SCALE), _level(0.05, MARKINGS_SCALE)
    for lung in anat.lungs:
        hu, hv = lung.hilum
        for _ in range(11):
            angle = rng.uniform(-1.3, 1.3) + (np.pi if lung.side < 0 else 0.0)
            if anat.lateral:
                angle = rng.uniform(-np.pi, np.pi)
            length = rng.uniform(0.08, 0.22)
            points = [(hu, hv)]
            for step in (0.35, 0.7, 1.0):
                a = angle + rng.normal(0, 0.2)
                points.append((hu + step * length * np.cos(a), hv + step * length * np.sin(a)))
            draw.line(c.xy(points[:3]), fill=trunk, width=c.width(0.009), joint="curve")
            draw.line(c.xy(points[2:]), fill=branch, width=c.width(0.005))


# ------------------------------------------------------------------------------------- findings


def _pneumothorax_rim(c: _Canvas, lung: _Lung, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The lucent rim between chest wall and collapsed lung, without lung markings; draws the pleural line."""
    gap = rng.uniform(0.04, 0.085) * (0.5 + 0.5 * strength)
    ax, ay = lung.ax - gap, lung.ay - gap
    ccx = lung.cx + np.sign(lung.hilum[0] - lung.cx) * 0.5 * gap
    ccy = lung.cy + 0.3 * gap
    win = c.window(lung.cx - lung.ax, lung.cx + lung.ax, lung.apex_v, lung.dome_top)
    u, v = c.local(win)
    q = np.sqrt(((u - ccx) / ax) ** 2 + ((v - ccy) / ay) ** 2)
    inside = lung.mask[win] * _ramp(lung.dome_top - 0.08 - v, 0.05)
    dist = (q - 1.0) * min(ax, ay)
    rim = np.zeros_like(c.img)
    rim[win] = _ramp(dist, 0.01) * inside
    line = np.exp(-((dist / max(0.005, 1.2 * c.px)) ** 2)) * inside
    c.img[win] += strength * (0.24 * line - 0.07 * rim[win])
    return rim * strength


def _effusion(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    lungs = anat.lungs if len(anat.lungs) == 1 or rng.random() < 0.35 else [anat.lungs[rng.integers(2)]]
    for lung in lungs:
        _, cp_v = lung.costophrenic()
        height = rng.uniform(0.07, 0.2) * (0.6 + 0.4 * strength)
        win = c.window(lung.cx - lung.ax, lung.cx + lung.ax, cp_v - height - 0.1, cp_v + 0.02)
        u, v = c.local(win)
        lateral = lung.side * (u - lung.cx) / lung.ax  # -1 medial edge, +1 chest wall
        surface = cp_v - height - rng.uniform(0.03, 0.07) * np.clip(lateral, 0.0, 1.0) ** 2  # meniscus
        fluid = _ramp(v - surface, 0.025) * _ramp(lateral + 0.3, 0.4)  # the posterolateral recess fills first
        c.img[win] += 0.3 * strength * fluid * lung.mask[win]


def _edema(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    for lung in anat.lungs:
        hu, hv = lung.hilum
        outward = 0.0 if anat.lateral else lung.side * 0.035
        sx = rng.uniform(0.07, 0.095) * (1.5 if anat.lateral else 1.0)
        c.add_gaussian(hu + outward, hv + 0.02, sx, rng.uniform(0.09, 0.12), 0.2 * strength, anat.lung_mask)
        for _ in range(4):  # Kerley B lines at the bases
            v = lung.costophrenic()[1] - rng.uniform(0.02, 0.1)
            wall = lung.wall_u(v) - lung.side * 0.005
            c.draw_markings.line(c.xy([(wall, v), (wall - lung.side * 0.03, v)]),
                                 fill=_level(0.1 * strength, MARKINGS_SCALE), width=c.width(0.006))


def _consolidation(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = anat.lungs[rng.integers(len(anat.lungs))]
    cx, cy = lung.point(c, rng, zone=(0.15, 0.8), avoid=anat.heart_mask)
    r = rng.uniform(0.075, 0.11) * (0.75 + 0.25 * strength)
    rx, ry = r * rng.uniform(0.85, 1.2), r * rng.uniform(0.75, 1.05)
    win = c.window(cx - 1.3 * rx, cx + 1.3 * rx, cy - 1.3 * ry, cy + 1.3 * ry)
    u, v = c.local(win)
    h, w = c.img[win].shape
    if h == 0 or w == 0:
        return
    wobble = Image.fromarray(rng.standard_normal((5, 5)).astype(np.float32), "F")
    wobble = np.asarray(wobble.resize((w, h), Image.BICUBIC))
    q = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2) + 0.22 * wobble
    patch = _ramp(1.0 - q, 0.45) * lung.mask[win]
    bronchi = np.zeros_like(patch)
    for _ in range(2):  # air bronchograms: dark branches inside the dense patch
        a = rng.uniform(0, np.pi)
        du, dv = np.cos(a) * 0.7 * rx, np.sin(a) * 0.7 * ry
        t = np.clip(((u - cx + du) * 2 * du + (v - cy + dv) * 2 * dv) / (4 * (du * du + dv * dv)), 0, 1)
        dist = np.hypot(u - cx + du - t * 2 * du, v - cy + dv - t * 2 * dv)
        bronchi = np.maximum(bronchi, _ramp(0.004 - dist, 2 * c.px))
    c.img[win] += strength * patch * (0.4 - 0.18 * bronchi)


def _pneumonia(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = anat.lungs[rng.integers(len(anat.lungs))]
    cx, cy = lung.point(c, rng, zone=(0.6, 0.85), avoid=anat.heart_mask)
    for _ in range(rng.integers(8, 14)):
        sigma = rng.uniform(0.012, 0.02)
        c.add_gaussian(cx + rng.normal(0, 0.035), cy + rng.normal(0, 0.03), sigma, sigma * rng.uniform(0.8, 1.2),
                       0.35 * strength, lung.mask)


def _atelectasis(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    for _ in range(1 + (rng.random() < 0.4)):
        lung = anat.lungs[rng.integers(len(anat.lungs))]
        cx, cy = lung.point(c, rng, zone=(0.5, 0.85), avoid=anat.heart_mask)
        half, tilt = rng.uniform(0.05, 0.085), rng.uniform(-0.3, 0.3)
        du, dv = half * np.cos(tilt), half * np.sin(tilt)
        c.add_segment((cx - du, cy - dv), (cx + du, cy + dv), rng.uniform(0.008, 0.012), 0.32 * strength, lung.mask)


def _lesion(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    """One to three sharp round nodules with a denser core."""
    for _ in range(1 + (rng.random() < 0.4) + (rng.random() < 0.2)):
        lung = anat.lungs[rng.integers(len(anat.lungs))]
        cx, cy = lung.point(c, rng, zone=(0.1, 0.8), avoid=anat.heart_mask)
        r = rng.uniform(0.03, 0.045) * (0.7 + 0.3 * strength)
        c.add_ellipse(cx, cy, r, r * rng.uniform(0.9, 1.1), 0.4 * strength)
        c.add_ellipse(cx, cy, 0.5 * r, 0.5 * r, 0.15 * strength, edge=0.5 * r)


def _pleural_thickening(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = anat.lungs[rng.integers(len(anat.lungs))]
    center = lung.at(rng.uniform(0.15, 0.8))
    half_length = rng.uniform(0.1, 0.18)
    thickness = rng.uniform(0.025, 0.04)
    win = c.window(lung.cx - lung.ax, lung.cx + lung.ax, center - half_length - 0.02, center + half_length + 0.02)
    u, v = c.local(win)
    q = np.sqrt(((u - lung.cx) / lung.ax) ** 2 + ((v - lung.cy) / lung.ay) ** 2)
    from_wall = (1.0 - q) * lung.ax
    lobulated = thickness * (1.0 + 0.35 * np.sin((v - center) * rng.uniform(60, 110)))
    band = _ramp(lobulated - from_wall, 2 * c.px) * _ramp(half_length - np.abs(v - center), 0.03)
    band *= (lung.side * (u - lung.cx) > 0) * lung.mask[win]
    c.img[win] += 0.38 * strength * band


def _fracture(c: _Canvas, anat: _Anatomy, p: _Patient, rng: np.random.Generator, strength: float) -> None:
    lung = anat.lungs[rng.integers(len(anat.lungs))]
    v = lung.at(rng.uniform(0.15, 0.65))
    for _ in range(rng.integers(2, 5)):  # consecutive ribs, one above the other
        u = lung.wall_u(v) - lung.side * rng.uniform(0.012, 0.025)
        c.add_gaussian(u, v, 0.028, 0.016, 0.55 * strength)
        c.add_segment((u + 0.004, v - 0.015), (u - 0.004, v + 0.015), 0.003, -0.15 * strength)
        v += p.rib_spacing * rng.uniform(0.9, 1.1)


def _support_devices(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    draw, wide = c.draw_overlay, c.width(0.009)
    bright, box, ring, wire = (_level(a * strength) for a in (0.5, 0.7, 0.6, 0.3))
    (tu, tv), (cu, cv) = anat.trachea
    hx, hy, hax, hay = anat.heart
    kinds = rng.choice(["tube", "central", "pacer", "leads", "chest"], size=rng.integers(1, 4), replace=False)
    if rng.random() < 0.6 and "tube" not in kinds:
        kinds = np.append(kinds, "tube")
    for kind in kinds:
        if kind == "tube":  # endotracheal tube, and a nasogastric tube down into the stomach
            draw.line(c.xy([(tu, tv), (cu, cv - rng.uniform(0.03, 0.07))]), fill=bright, width=wide)
            below = anat.dome_level + 0.1
            draw.line(c.xy([(tu + 0.01, tv), (cu + 0.015, cv + 0.1), (hx, hy), (hx + 0.1, below)]),
                      fill=bright, width=c.width(0.007), joint="curve")
        elif kind == "central":  # subclavian line to the superior vena cava
            side = rng.choice([-1, 1])
            path = [(0.5 + side * 0.3, cv - 0.12), (0.5 + side * 0.12, cv - 0.08), (cu - 0.01, cv + 0.02),
                    (cu - 0.01, cv + rng.uniform(0.06, 0.12))]
            draw.line(c.xy(path), fill=bright, width=c.width(0.006), joint="curve")
        elif kind == "pacer":  # generator box in the upper chest, lead into the heart
            gx, gy = (0.25 if anat.lateral else 0.72) + rng.normal(0, 0.02), cv - 0.1 + rng.normal(0, 0.02)
            draw.rounded_rectangle(c.xy([(gx - 0.04, gy - 0.025), (gx + 0.04, gy + 0.025)]),
                                   radius=c.width(0.012), fill=box)
            draw.line(c.xy([(gx, gy), (cu + 0.02, cv), (hx + 0.3 * hax, hy + 0.3 * hay)]), fill=bright,
                      width=c.width(0.006), joint="curve")
        elif kind == "leads":  # ECG electrodes with their wires
            for _ in range(3):
                eu, ev = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.8)
                r = 0.02
                draw.ellipse(c.xy([(eu - r, ev - r), (eu + r, ev + r)]), outline=ring, width=c.width(0.007))
                draw.line(c.xy([(eu, ev), (eu + rng.uniform(-0.3, 0.3), 1.0)]), fill=wire, width=c.width(0.004))
        else:  # chest tube along the lateral wall up to the apex
            lung = anat.lungs[rng.integers(len(anat.lungs))]
            low = lung.at(0.8)
            wall = lung.wall_u(low)
            path = [(wall + lung.side * 0.05, low + 0.05), (wall - lung.side * 0.02, low),
                    (lung.cx + lung.side * 0.2 * lung.ax, lung.at(0.08))]
            draw.line(c.xy(path), fill=bright, width=c.width(0.011), joint="curve")


def _opacity(c: _Canvas, anat: _Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = anat.lungs[rng.integers(len(anat.lungs))]
    cx, cy = lung.point(c, rng, zone=(0.15, 0.85), avoid=anat.heart_mask)
    sigma = rng.uniform(0.04, 0.055)
    c.add_gaussian(cx, cy, sigma, sigma * rng.uniform(0.8, 1.3), 0.22 * strength, anat.lung_mask)


# ---------------------------------------------------------------------------------------- image


def render_radiograph(signs: np.ndarray, view: str, size: int, seed: int, patient: int, image: int, marker: bool = False) -> np.ndarray:
    """One (size, size) uint8 radiograph showing each finding at strength signs[k] (order of LABELS); with `marker`, a
    bright tag in the top-left corner (`synth --planted-shortcut`, planted_gap.py)."""
    sign = {name: float(signs[k]) for k, name in enumerate(LABELS)}
    p = _patient(seed, patient)
    rng = np.random.default_rng([seed, _STREAM_IMAGE, image])
    c = _Canvas(size)
    lateral = view == "LATERAL"
    anat = _lateral(c, p, rng, sign) if lateral else _frontal(c, p, view, rng, sign)

    def finding_rng(name: str) -> np.random.Generator:
        k = LABELS.index(name)
        if name in PERSISTENT:  # same place in every study of the patient
            return np.random.default_rng([seed, _STREAM_PERSISTENT_SIGN, patient, k, int(lateral)])
        return np.random.default_rng([seed, _STREAM_SIGN, image, k])

    hide = None
    if sign["Pneumothorax"] > 0:
        r = finding_rng("Pneumothorax")
        hide = _pneumothorax_rim(c, anat.lungs[r.integers(len(anat.lungs))], r, sign["Pneumothorax"])
    _vessels(c, anat, rng)
    drawers = {
        "Edema": _edema, "Consolidation": _consolidation, "Pneumonia": _pneumonia, "Atelectasis": _atelectasis,
        "Lung Lesion": _lesion, "Lung Opacity": _opacity, "Pleural Effusion": _effusion,
        "Pleural Other": _pleural_thickening, "Support Devices": _support_devices,
    }
    for name, draw in drawers.items():
        if sign[name] > 0:
            draw(c, anat, finding_rng(name), sign[name])
    if sign["Fracture"] > 0:
        _fracture(c, anat, p, finding_rng("Fracture"), sign["Fracture"])
    exposed = _expose(c.finish(anat.lung_mask, hide, rng), rng)
    return _draw_marker(exposed) if marker else exposed


def _draw_marker(img: np.ndarray) -> np.ndarray:
    """A bright square tag with a dark bar, a twelfth of the side, near the top-left corner (a portable film's marker)."""
    side, at = max(4, img.shape[0] // 12), max(1, img.shape[0] // 32)
    img = img.copy()
    img[at : at + side, at : at + side] = 245
    img[at + side // 3 : at + side - side // 3, at + side // 4 : at + side - side // 4] = 40
    return img


# Standard-normal quantiles of 256 equiprobable bins: random bytes -> Gaussian noise, cheaply.
_GAUSS_BYTES = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)
_SMOOTH = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1])


def _expose(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Detector response: quantum noise, slight blur, 8 bits, then gamma and gain as a lookup table."""
    size = img.shape[0]
    noise = _GAUSS_BYTES[np.frombuffer(rng.bytes(size * size), dtype=np.uint8).reshape(size, size)]
    img = img * 255.0 + noise * (255.0 * rng.uniform(0.025, 0.06)) + 0.5
    quantised = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").filter(_SMOOTH)
    levels = np.linspace(0.0, 1.0, 256) ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    return np.clip(np.rint(levels * 255), 0, 255).astype(np.uint8)[np.asarray(quantised)]


def render_image(cohort: Cohort, index: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Image `index` of `cohort`, exactly as make_synthetic_dataset writes it."""
    return render_radiograph(cohort.signs[index], cohort.table["view"].iat[index], size, seed,
                             int(cohort.patient_index[index]), index)
