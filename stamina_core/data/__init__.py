"""Built-in data: Animal-MNIST (from the pip wheel, safe loader), procedural glyphs, the continual benchmark."""
