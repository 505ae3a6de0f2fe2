"""Errors a user can cause. The CLI prints their message as one line and exits 2."""


class NeurolensError(Exception):
    """Bad input or an unusable environment: the message says what was wrong and what to do."""


class UnknownLayerError(NeurolensError):
    pass


class UnitOutOfRangeError(NeurolensError):
    pass


class WeightsUnavailableError(NeurolensError):
    pass


class DatasetError(NeurolensError):
    pass
