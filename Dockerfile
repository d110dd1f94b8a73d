# One image for every role: service replica, mock Node API, simulator, CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY provisioner ./provisioner
COPY lua ./lua
RUN pip install . && useradd --system --uid 10001 provisioner

USER provisioner
EXPOSE 9100
ENTRYPOINT ["provisioner"]
CMD ["--help"]
