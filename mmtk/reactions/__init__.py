"""PPF (partial-parameters freezing): discovery of mass-action reaction networks.

The method is from J. Huang, Y. Zhou and W.-A. Yong, "Data-driven discovery
of multiscale chemical reactions governed by the law of mass action",
J. Comput. Phys. 448 (2022) 110743. A single mass-action layer with a signed
stoichiometric matrix and log rate constants is fitted to (c, dc/dt) pairs,
and columns of the matrix that come close to integers are rounded and frozen.
"""
