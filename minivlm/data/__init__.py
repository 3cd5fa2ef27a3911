"""Data for the course: the procedural shapes world, and loaders for folders of real captioned images.

- `minivlm.data.shapes`: scenes of 1–3 coloured shapes, rendered anti-aliased, with exact captions, a
  caption parser, train / test / compositional held-out splits, and question–answer pairs.
- `minivlm.data.folders`: images with COCO-style caption JSON, or a CSV of `image,caption` rows.
- `minivlm.data.captions`: the shapes world as (image, caption) items like the folders', and the collate
  that tokenises, appends end-of-text, pads and masks them into training batches.
"""
