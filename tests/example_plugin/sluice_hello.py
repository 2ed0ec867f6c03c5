"""sluice-hello: adds a greeting header to every response, rejects bots with 403."""

from sluice import CONTINUE, Filter, FilterConfig, LocalReply, hookimpl


class Hello(Filter):
    name = "hello"  # what configs write in a listener's `filters` list

    class Config(FilterConfig):  # settings under [filters.hello], validated at startup
        greeting: str = "hello from a plugin"
        blocked_agents: list[str] = ["BadBot"]

    async def on_request_headers(self, ctx, request):
        agent = request.headers.get("user-agent", "")
        if any(bot in agent for bot in self.config.blocked_agents):
            return LocalReply(403, "no bots, please\n")  # the upstream never sees it
        return CONTINUE

    async def on_response_headers(self, ctx, response):
        response.headers.set("x-hello", self.config.greeting)
        return CONTINUE


@hookimpl
def sluice_filters():
    return [Hello]
