"""The error of bad input files: its message is one line that names the file and the problem."""


class DataError(Exception):
    """Bad input: ``str(err)`` is ``"<path>: <problem>"``; commands print it and exit with status 2."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # survives the trip back from a worker process
        return (DataError, (self.path, self.problem))
