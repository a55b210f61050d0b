"""Make docs/img/fov-pillcam.png, what the model sees of a PillCam-like export with `field_of_view` full and fov:
`python tests/fov_figure.py [OUT.png]` (needs ../shared/data/real; the frame is Kvasir-Capsule's, CC BY 4.0)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from test_real_inputs import KVASIR, pillcam_like

from capsule_batch.model.preprocess import reference_preprocess, seed_preprocess, to_rgb


def main(out: Path) -> None:
    export = pillcam_like(KVASIR / "images" / "131368cc17e44240_28960.jpg")
    full, fov = seed_preprocess(), dataclasses.replace(seed_preprocess(), field_of_view="fov")
    panels = [("the export (576x576)", Image.fromarray(export).resize((224, 224), Image.BICUBIC)),
              ("model input, full", Image.fromarray(to_rgb(reference_preprocess(export, full), full))),
              ("model input, fov", Image.fromarray(to_rgb(reference_preprocess(export, fov), fov)))]
    fig = Image.new("RGB", (3 * 224 + 40, 224 + 24), "white")
    draw = ImageDraw.Draw(fig)
    for k, (title, img) in enumerate(panels):
        fig.paste(img, (k * 244, 24))
        draw.text((k * 244 + 4, 4), title, fill=(0, 0, 0))
    fig.save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs/img/fov-pillcam.png")
