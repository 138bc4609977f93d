"""Stage contracts: everything that crosses from one stage to the next, defined once, torch-free.

- `versioned`: the one format/version header check every versioned file goes through.
- `card`: the model card (model.json) and its preprocessing, with its one reader and one writer.
- `pixels`: an image of any mode and size -> the model's uint8 pixels (training's decode and `/classify`'s).
- `data`: the data source (dataset, directory, split seed, options) that every stage rebuilds a split from.
- `report`: the bench report schema, built by bench, read by its gates and its report writers.

Nothing here imports torch or a stage package, so `okdpipe serve` reads cards from a torch-free install.
"""
