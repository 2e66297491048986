FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
# The production gateway only: the BitGo sandbox (sandbox/) is a development tool.
COPY api ./api
COPY cli ./cli
COPY config ./config
COPY models ./models
COPY workers ./workers
RUN pip install --no-cache-dir .
# /var/lib/oes-beat holds celery beat's schedule file (a named volume in docker-compose.yml).
RUN useradd --system --uid 10001 oes && mkdir -p /var/lib/oes-beat && chown oes /var/lib/oes-beat
USER oes
EXPOSE 8000
CMD ["oes-partner", "serve", "--host", "0.0.0.0", "--port", "8000"]
