"""The fine-tuning update as an artifact: extracted once from a source pair (extract.py), stored exact or
compressed (encodings/), applied to any new base as a recipe's diff (apply.py), judged against a target without
the source base (sketch.py). The format is README's "Diff artifacts" section."""
