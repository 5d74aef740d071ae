"""What is built on the retriever but is not retrieval: the command line (:mod:`.cli`), the
blinded judging page (:mod:`.judge`), label-based evaluation (:mod:`.evaluate`), contact
sheets (:mod:`.sheet`) and the demo (:mod:`.demo`)."""
