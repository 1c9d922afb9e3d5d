// Example: an OpenClaw-style plugin in TypeScript (run through Node's type
// stripping; no build step, no npm dependencies). It loads unchanged in
// OpenClaw and in this gateway.
import { greet } from "./greet.ts";

type Api = {
  id: string;
  pluginConfig: { greeting?: string };
  logger: { info(...args: unknown[]): void };
  registerGatewayMethod(name: string, handler: (opts: any) => unknown, opts?: { scope?: string }): void;
  registerService(service: { id: string; start(ctx: any): unknown; stop?(ctx: any): unknown }): void;
};

// Module state lives as long as this generation's process: a restart starts
// it from zero. Durable state goes to the service's ctx.stateDir.
let greeted = 0;
let startedAt: number | null = null;

export default {
  id: "js-greeter",
  register(api: Api) {
    // A method that computes from params, and emits an event to the caller.
    api.registerGatewayMethod(
      "js-greeter.greet",
      ({ params, client, context }) => {
        if (typeof params.name !== "string" || params.name.length === 0) {
          throw new Error("params.name must be a non-empty string");
        }
        greeted += 1;
        const text = greet(api.pluginConfig.greeting ?? "Hello", params.name);
        context.broadcastToConnIds("plugin.js-greeter.greeted", { text }, [client.connId]);
        return { text, greeted, serviceStartedAt: startedAt };
      },
      { scope: "operator.read" },
    );
    // A service: started once the previous generation's process stopped.
    api.registerService({
      id: "clock",
      start(ctx) {
        startedAt = Date.now();
        api.logger.info(`clock started; state in ${ctx.stateDir}`);
      },
      stop() {
        api.logger.info(`clock stopped after ${greeted} greetings`);
      },
    });
  },
};
