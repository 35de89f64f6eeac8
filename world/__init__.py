"""The small world of issue 15: clips rendered in code with their ground truth (scenes), the world's text-to-image
models (models), motion training and applying there (motion), the measures that read generated clips against their
prompts (measure), and the study that puts them together (study, ``python -m headless world``)."""
