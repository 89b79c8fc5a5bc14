"""A trained policy outside training: ``export`` writes a self-contained model folder, ``pretrained`` loads
one (``recpost.load_pretrained``), ``serve`` answers ``recpost recommend`` from it."""
