"""One module per DVC stage. Each exposes ``run(config)``: explicit input and output paths in, files out."""
