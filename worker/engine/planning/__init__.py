"""What to build: the request (options, recipes, imported mergekit configs, patterns) and the plan made from
it and the inputs' headers. No tensor data is read here. Imports storage (headers) and methods (parameters)."""
