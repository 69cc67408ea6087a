"""Files of :class:`locdiff.answers.Answers`: JSON Lines (one object per input), CSV (one
line per input and mode) and an interactive HTML map (folium: the density as a heat layer,
the modes as markers with their probabilities, one layer per input).

The map embeds Leaflet (from the ``xstatic-leaflet`` package) and the heat-map plugin (from
folium) in the page, so it opens without a network apart from the map tiles. Every file is
written atomically.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from locdiff.answers import level_label
from locdiff.data.files import atomic_write_bytes, atomic_write_csv
from locdiff.extras import require

CSV_FIELDS = ("input", "rank", "lat", "lon", "probability", "country", "country_code", "region", "place",
              "place_km")
# Inputs an HTML map shows: each keeps its whole density grid until the map is written.
HTML_MAX_INPUTS = 20


def write_jsonl(path, answers) -> None:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in answers.records()]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def _csv_text(text: str) -> str:
    """A name as a CSV cell no spreadsheet evaluates: a leading ``= + - @``, tab or carriage
    return (a photo named ``=HYPERLINK(...).jpg``) gets a quote before it (OWASP's rule)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(path, answers) -> None:
    """One line per (input, mode); the credible areas and radii repeat on each line."""
    cred = [f"{name}_{level_label(q)}" for q in answers.levels for name in ("area_km2", "radius_km")]

    def rows():
        for rec in answers.records():
            tail = [rec["other_probability"]] + [v for c in rec["credible"].values() for v in c.values()]
            for m in rec["modes"] or [{}]:
                yield [_csv_text(rec["input"]), *(m.get(f, "") for f in CSV_FIELDS[1:]), *tail]
    atomic_write_csv(path, [*CSV_FIELDS, "other_probability", *cred], rows())


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _offline_assets():
    """(Leaflet js, Leaflet css, leaflet-heat js) as data URLs from the installed packages."""
    folium = require("folium", "the HTML map")
    leaflet = require("xstatic.pkg.leaflet", "the offline HTML map")
    base = Path(leaflet.BASE_DIR)
    heat = Path(folium.__file__).parent / "templates" / "leaflet_heat.min.js"
    return (_data_url(base / "leaflet.js", "text/javascript"), _data_url(base / "leaflet.css", "text/css"),
            _data_url(heat, "text/javascript"))


def _heat_points(answers, i: int, floor: float):
    """[lat, lon, weight] of the cells whose density per unit area is above ``floor`` of
    the peak; weights relative to the peak."""
    g = answers.grid
    dens = answers.density[i] / g.area.numpy()
    keep = np.flatnonzero(dens >= floor * dens.max())
    ll = g.latlon.numpy()[keep]
    w = dens[keep] / dens.max()
    return [[round(float(a), 4), round(float(b), 4), round(float(c), 4)] for (a, b), c in zip(ll, w)]


def _html_text(text: str) -> str:
    """``text`` as HTML text that also stays inert inside the JavaScript template literals
    folium puts popups and layer names in: ``${...}`` there runs as script (a photo named
    ``${alert(1)}.jpg``), so ``$``, backticks and backslashes become character references."""
    import html

    return html.escape(text).replace("$", "&#36;").replace("`", "&#96;").replace("\\", "&#92;")


def _popup(rec: dict, m: dict) -> str:
    where = _html_text(", ".join(x for x in (m.get("place"), m.get("region"), m.get("country")) if x))
    return (f"<b>{_html_text(rec['input'])}</b><br>mode {m['rank']}: {m['probability']:.1%}<br>{m['lat']:.4f}, {m['lon']:.4f}"
            + (f"<br>{where} ({m['place_km']:.0f} km)" if where else ""))


def write_html_map(path, answers, max_inputs: int = HTML_MAX_INPUTS, heat_floor: float = 0.01) -> None:
    """An interactive map of the first ``max_inputs`` inputs (needs ``answers.density``:
    ``summarize(..., density=True)`` or ``density=max_inputs``); the first input's layer is
    shown, the others can be switched on in the layer list."""

    folium = require("folium", "the HTML map")
    from folium.plugins import HeatMap

    if answers.density is None:
        raise ValueError("the HTML map needs the densities: summarize(..., density=True) or predict(..., density=True)")
    leaflet_js, leaflet_css, heat_js = _offline_assets()
    fmap = folium.Map(location=[20, 0], zoom_start=2, tiles="OpenStreetMap", world_copy_jump=True)
    # Only Leaflet itself is needed (no jQuery, Bootstrap or icon fonts), from the page.
    fmap.default_js, fmap.default_css = [("leaflet", leaflet_js)], [("leaflet_css", leaflet_css)]
    for i, rec in enumerate(answers.records()[:min(max_inputs, len(answers.density))]):
        layer = folium.FeatureGroup(name=_html_text(rec["input"]), show=i == 0)
        heat = HeatMap(_heat_points(answers, i, heat_floor), radius=18, blur=15, min_opacity=0.3)
        heat.default_js = [("leaflet-heat.js", heat_js)]
        heat.add_to(layer)
        for m in rec["modes"]:
            folium.CircleMarker([m["lat"], m["lon"]], radius=6 + 14 * m["probability"], color="#08519c",
                                fill=True, fill_opacity=0.7, popup=folium.Popup(_popup(rec, m), max_width=320),
                                tooltip=f"{m['rank']}: {m['probability']:.0%}").add_to(layer)
        layer.add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, fmap.get_root().render().encode("utf-8"))
