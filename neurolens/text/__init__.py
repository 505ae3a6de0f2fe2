"""Text: vocab (vocabularies), encode (the one text encoder) and directions (unit directions in the joint
embedding space, top-k texts per unit)."""
