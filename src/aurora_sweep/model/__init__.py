"""Aurora as a trial uses it: building a base with the target's head and the method's trainable
parts (`build`), Aurora 1.5's six-hour wrapper (`aurora15`), Aurora's loss (`loss`) and an
adapter on disk (`adapter`), the files a study needs and a registered adapter fetched
(`files`).

May import `data`, `config` and the shared leaves.
"""
