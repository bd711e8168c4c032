"""The service core shared by the API (app/) and the RQ worker: settings, job records in Redis, job kinds and
their runners, URI policy (tenant confinement), webhooks, recovery from killed workers. Calls the engine; the
engine never imports it."""
