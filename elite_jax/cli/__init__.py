"""The command-line tools, the only place that parses arguments: ``elite-infer``, ``elite-train``,
``elite-evaluate``, ``elite-export`` (``[project.scripts]``). Each parses its flags and calls the library."""
