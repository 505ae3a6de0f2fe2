"""The paper's dataset audits: caption string-match audit and the image-text cosine probe."""
