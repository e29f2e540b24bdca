"""The one exception type for bad user input.

Entry points (``elite_jax.cli``) catch it and print its message on one line with exit code 2; library users get a
ValueError subclass whose message names the problem.
"""


class InputError(ValueError):
  """A file, value or shape given by the user that cannot be used, with a message that says why."""
