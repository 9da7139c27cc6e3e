"""The gallery against a model of itself (hypothesis' stateful testing): random runs of enrollments and deletions,
from this process's store or another one on the same file, re-embeddings by a newer model, clean restarts,
kill -9 restarts (the index file left as last saved) and damaged index files. After every step the FAISS index
holds exactly the store's current faces, and every face finds its own subject first: the index is a cache of the
store, whatever happened to it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from app_helpers import V1, V2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from app.gallery import Gallery
from app.index import IndexConfig
from app.store import Store, SubjectRef

DIM = 32
POOL = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, DIM)))[0].T.astype(np.float32)  # orthonormal
NAMES = st.sampled_from(["ada", "bo", "cy", "di"])


class GalleryMachine(RuleBasedStateMachine):
    faces = Bundle("faces")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="visage-gallery-model-"))
        self.gallery = self._open()
        self.other = Store(self.dir / "visage.db")  # another process writing to the same file
        self.current: dict[int, tuple[str, int]] = {}  # face id -> (subject name, pool row), model version V1
        self.free = list(range(DIM))  # pool rows not enrolled yet: every face is its own direction

    def _open(self) -> Gallery:
        gallery = Gallery(Store(self.dir / "visage.db"), self.dir / "index.faiss", V1, DIM, IndexConfig())
        gallery.open()
        return gallery

    def _store(self, elsewhere: bool) -> Store:
        return self.other if elsewhere else self.gallery.store

    @rule(target=faces, name=NAMES, elsewhere=st.booleans())
    def enroll(self, name: str, elsewhere: bool):
        if not self.free:
            return None
        row = self.free.pop()
        face, _, _ = self._store(elsewhere).add_face(
            SubjectRef(name=name), f"sha-{row}", None, POOL[row], V1, (0, 0, 10, 10), 0.9)
        self.current[face.id] = (name, row)
        return face.id

    @rule(face_id=consumes(faces), elsewhere=st.booleans())
    def delete_face(self, face_id: int | None, elsewhere: bool) -> None:
        if face_id in self.current:
            self._store(elsewhere).delete_face(face_id)
            self.current.pop(face_id)

    @rule(name=NAMES, elsewhere=st.booleans())
    def delete_subject(self, name: str, elsewhere: bool) -> None:
        mine = [f for f, (owner, _) in self.current.items() if owner == name]
        if mine:
            store = self._store(elsewhere)
            store.delete_subject(store.subject(SubjectRef(name=name)).id)
            for face_id in mine:
                self.current.pop(face_id)

    @rule(face_id=consumes(faces))
    def reembed_by_a_newer_model(self, face_id: int | None) -> None:
        if face_id in self.current:
            row = self.current.pop(face_id)[1]
            assert self.other.reembed_face(face_id, V1, POOL[row], V2, (0, 0, 10, 10), 0.9)

    @rule()
    def restart(self) -> None:
        self.gallery.close()  # saves the index
        self.gallery = self._open()

    @rule()
    def kill_9_and_restart(self) -> None:
        self.gallery.store.close()  # no save: the index file is whatever the last clean stop or rebuild wrote
        self.gallery = self._open()

    @rule(garbage=st.binary(max_size=64))
    def damage_the_index_file_and_restart(self, garbage: bytes) -> None:
        self.gallery.store.close()
        (self.dir / "index.faiss").write_bytes(garbage)
        self.gallery = self._open()

    @invariant()
    def the_index_holds_exactly_the_stores_current_faces(self) -> None:
        agreement = self.gallery.agreement()
        assert agreement["agree"] and agreement["store_faces"] == len(self.current), agreement

    @invariant()
    def every_face_finds_its_own_subject_first(self) -> None:
        if not self.current:
            return
        rows = [row for _, row in self.current.values()]
        for (name, _), hits in zip(self.current.values(), self.gallery.identify(POOL[rows], k=1), strict=True):
            assert hits[0].name == name and abs(hits[0].similarity - 1.0) < 1e-5

    def teardown(self) -> None:
        try:
            self.gallery.close()
            self.other.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


GalleryMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow])
test_the_index_stays_a_cache_of_the_store = GalleryMachine.TestCase
