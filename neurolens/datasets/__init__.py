"""Image datasets: types (ImageDataset, IdentityHash, extensions), decode (reading and decoding one item
safely, BadImage, CLIP's resize and crop), folder, table, tar (webdataset shards, img2dataset output), open
(open_dataset, dataset_from_keys) and builtin (scikit-image's sample images)."""
