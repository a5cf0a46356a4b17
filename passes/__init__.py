"""Graph passes of the fxprune pipeline (installed as ``fxprune.passes``).

Analysis passes (``dependency``, ``cost``, ``score_*``) only write ``node.meta["fxprune.*"]``; the one
transform pass (``rewrite``) returns a new GraphModule. ``base.AnalysisPass`` checks the first promise.
"""
