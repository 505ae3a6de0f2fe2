"""Where neurolens gets its judgements about images from, and what it does with them.

- label sources (captions, a dataset column, NudeNet, the inspected model's zero-shot score) and the
  check of how far each can be trusted on the data at hand;
- `lexicon`: the NSFW term files and the caption / URL string match; `zero_shot`: the prompts and CLIP's
  zero-shot NSFW scores of images and texts;
- `nudenet`: the independent detector (NudeNet's ONNX model, offline);
- `policy`: THE blur policy. Every writer of pixels (PNGs, panels, grids, the demo, the web app and the
  static site) asks `BlurPolicy` whether an image is shown blurred; nothing else decides that.
"""
