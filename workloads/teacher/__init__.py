"""The teacher of a ``distill`` stage: one interface, three placements.

Every placement answers the same call, once per micro-batch::

    teacher.rows(student_logits, batch, inputs, image_mask, sctx) -> (s, rows)

``s`` is the student's logits cut to the vocabulary both models share; ``rows`` is the
teacher's side of the batch (``workloads/kd_terms/teacher_rows.py``), which every KD term reads
the same way (``x.divergence_at``, ``x.relation``, ``x.rows``) whatever the placement:

- ``online.py`` — ``OnlineTeacher``: the model in every student worker (partitioned under
  ZeRO-3), run on the student's batch (``DenseRows``) or on its own encoding of each row
  (``PairedRows``); it also probes that it sees the images and guards that nothing updates it
  (``checks``);
- ``offline.py`` — ``OfflineTeacher``: entries a ``teacher_logits`` stage stored
  (``StoredRows``);
- ``service/`` — ``ServiceClient``: the same entries computed on demand by a shared Ray
  service, each batch's request sent one step ahead (``ahead``).

``payload.py`` defines the entries once — what the ``teacher_logits`` stage writes, what the
service sends and what ``StoredRows`` is built from. ``top_k`` is one typed value: the stage's
``top_k`` (``teacher_logits``, or ``distill`` with ``teacher: service``) goes into the entries'
width and nowhere else; the loss reads it from the entries. Its whole path: ``teacher_logits``
→ ``payload.teacher_entries``; ``distill`` → ``ServiceSpec`` (``service/spec.py``, whose
``entries`` a replica calls) → ``payload.teacher_entries``.
"""
