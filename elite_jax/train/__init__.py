"""Two-stage ELITE training: ``config`` (the schema and the official recipe), ``losses`` (the objectives),
``program`` (models on the mesh, optimizer, state, the jitted step: built once by ``program.build``),
``checkpoint`` (Orbax saves and restores), ``loop`` (``train(config, workdir)``)."""
