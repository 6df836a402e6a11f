"""``teacher: service`` — the frozen teacher as a shared Ray service (see ``actors.py`` for the
data path, ``client.py`` for the stage's and the workers' side, ``spec.py`` for naming)."""

from workloads.teacher.service.client import (ServiceClient, ServiceUse, TeacherServiceError,
                                              find_service, release_run)
from workloads.teacher.service.spec import NAMESPACE, ServiceSpec

__all__ = ["NAMESPACE", "ServiceSpec", "ServiceUse", "ServiceClient", "TeacherServiceError",
           "find_service", "release_run"]
