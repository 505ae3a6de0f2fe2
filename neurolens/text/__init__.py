"""Text: vocabularies, the text encoder and unit directions in the joint embedding space."""
