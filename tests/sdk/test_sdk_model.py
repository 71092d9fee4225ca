"""Model.list / Model.get against the fake server."""

from llmengine import Model, NotFoundError, api_engine
from sdk_fake_server import ENDPOINT


def test_list_returns_endpoints_and_keeps_unknown_fields(fake):
    response = Model.list()
    (endpoint,) = response.model_endpoints
    assert (endpoint.name, endpoint.status, endpoint.source) == ("echo", "READY", "hugging_face")
    assert endpoint.inference_framework == "fake"
    assert endpoint.max_model_len == 2048
    assert response.dict() == {"model_endpoints": [ENDPOINT]}
    assert fake.hits[0]["method"] == "GET" and fake.hits[0]["path"] == "/v1/llm/model-endpoints"


def test_get_one_and_missing(fake):
    api_engine.set_api_key("k")
    endpoint = Model.get("echo")
    assert endpoint.name == "echo" and endpoint.num_shards == 1
    assert fake.hits[0]["path"] == "/v1/llm/model-endpoints/echo"
    assert fake.hits[0]["headers"]["x-api-key"] == "k"
    try:
        Model.get("no such model")
    except NotFoundError as exc:
        assert exc.status_code == 404 and "no such model" in str(exc.detail)
    else:
        raise AssertionError("expected NotFoundError")
    assert fake.hits[1]["path"] == "/v1/llm/model-endpoints/no such model"
