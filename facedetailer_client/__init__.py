"""Python client of facedetailer-serve: ``FaceDetailerClient`` (blocking) and ``AsyncFaceDetailerClient``.

Depends on httpx only (numpy and Pillow are used when given arrays or asked to decode)::

    from facedetailer_client import FaceDetailerClient

    with FaceDetailerClient("http://127.0.0.1:8000") as client:  # api_key=… or $FACEDETAILER_API_KEY
        result = client.detail("photo.jpg", {"steps": 20, "denoise": 0.4})
        open("detailed.png", "wb").write(result.image)
        for face in result.segments[0]:
            print(face.bbox, face.confidence, face.seed, face.skipped)
"""

from facedetailer_client.client import (
    API_KEY_ENV,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    AsyncFaceDetailerClient,
    FaceDetailerClient,
)
from facedetailer_client.models import (
    DetailResult,
    FaceEvent,
    PlanEvent,
    PlannedFace,
    RetryBudgetExceeded,
    Segment,
    ServiceError,
    StepProgress,
)
from facedetailer_client.retry import RetryPolicy, parse_retry_after

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AsyncFaceDetailerClient",
    "DetailResult",
    "FaceDetailerClient",
    "FaceEvent",
    "PlanEvent",
    "PlannedFace",
    "RetryBudgetExceeded",
    "RetryPolicy",
    "Segment",
    "ServiceError",
    "StepProgress",
    "parse_retry_after",
]
