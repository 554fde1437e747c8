from .conftest import assert_schema

def test_chat(stack, client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello, world! How can I help you?"
    assert_schema(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
