"""The one exception type for bad user input.

Entry points (infer.py, train.py, evaluate) catch it and print its message on one line with exit code 2; library users
get a ValueError subclass whose message names the problem.
"""


class InputError(ValueError):
  """A file, value or shape given by the user that cannot be used, with a message that says why."""


def exit_code(fn, *args) -> int:
  """Run an entry point's body: 0 when it returns, 2 with ``error: <message>`` on stderr for an InputError."""
  import sys
  try:
    fn(*args)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
