# The image compose.yaml builds for the API replicas and the workers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY runstate ./runstate
COPY workers ./workers
RUN pip install --no-cache-dir ".[http,fast]"
ENV PYTHONUNBUFFERED=1
